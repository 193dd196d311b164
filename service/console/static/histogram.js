// Reference-versus-window histograms as inline SVG: reference shares as filled bars, the
// window's as outlined bars on the same bins, so the two read apart without colour too.

import { el, number, percent } from "./format.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 220;
const PAD = { left: 48, right: 12, top: 12, bottom: 40 };

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  node.append(...children);
  return node;
}

function binName(edges, i) {
  return `${number(edges[i])} to ${number(edges[i + 1])}`;
}

function fullestBin(edges, shares) {
  return binName(edges, shares.indexOf(Math.max(...shares)));
}

function chart(id, title, { edges, reference, window: shares }) {
  const top = Math.max(...reference, ...shares, 1e-9);
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const bar = plotWidth / Math.max(1, reference.length);
  const bottom = PAD.top + plotHeight;
  const y = (share) => PAD.top + plotHeight * (1 - share / top);

  const grid = [0, 0.5, 1].map((f) =>
    svg(
      "g",
      {},
      svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(top * f), y2: y(top * f), class: "grid" }),
      svg("text", { x: PAD.left - 6, y: y(top * f) + 4, "text-anchor": "end", class: "tick" }, percent(top * f, 0)),
    ),
  );
  const bars = reference.flatMap((ref, i) => {
    const x = PAD.left + i * bar;
    const win = shares[i];
    return [
      svg("rect", { x, y: y(ref), width: Math.max(0, bar - 1), height: bottom - y(ref), class: "reference" }),
      svg("rect", { x: x + 1, y: y(win), width: Math.max(0, bar - 3), height: bottom - y(win), class: "window" }),
    ];
  });
  const middle = Math.floor(edges.length / 2);
  const ticks = [
    [PAD.left, edges[0], "start"],
    [PAD.left + middle * bar, edges[middle], "middle"],
    [WIDTH - PAD.right, edges[edges.length - 1], "end"],
  ].map(([x, value, anchor]) =>
    svg("text", { x, y: bottom + 16, "text-anchor": anchor, class: "tick" }, number(value)),
  );
  const description =
    `Share of events per bin. Reference: most between ${fullestBin(edges, reference)}. ` +
    `Window: most between ${fullestBin(edges, shares)}.`;
  return svg(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      role: "img",
      "aria-labelledby": `${id}-title ${id}-desc`,
      class: "histogram",
    },
    svg("title", { id: `${id}-title` }, `${title}: reference versus window`),
    svg("desc", { id: `${id}-desc` }, description),
    ...grid,
    ...bars,
    svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: bottom, y2: bottom, class: "axis" }),
    ...ticks,
    svg("text", { x: PAD.left + plotWidth / 2, y: HEIGHT - 4, "text-anchor": "middle", class: "axis-label" }, title),
  );
}

// The chart, a legend, and the numbers behind it as a table for those who do not see it.
export function histogramFigure(id, title, histogram) {
  const { edges, reference, window: shares } = histogram;
  const rows = reference.map((ref, i) =>
    el(
      "tr",
      {},
      el("th", { scope: "row" }, binName(edges, i)),
      el("td", { class: "num" }, percent(ref)),
      el("td", { class: "num" }, percent(shares[i])),
    ),
  );
  return el(
    "figure",
    { class: "histogram-figure" },
    chart(id, title, histogram),
    el(
      "figcaption",
      {},
      el("strong", {}, title),
      " ",
      el("span", { class: "swatch reference", "aria-hidden": "true" }),
      " reference (filled) ",
      el("span", { class: "swatch window", "aria-hidden": "true" }),
      " window (outlined)",
    ),
    el(
      "details",
      {},
      el("summary", {}, `${title}: values`),
      el(
        "table",
        {},
        el("caption", { class: "visually-hidden" }, `${title}: share of events per bin`),
        el("thead", {}, el("tr", {}, ["bin", "reference", "window"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows),
      ),
    ),
  );
}
