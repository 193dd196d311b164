// DOM building and number, time and name formatting shared by the views. Text always goes in
// as text nodes, never as HTML, so nothing from the API can inject markup.

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function number(value, digits = 3) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "n/a";
  if (Number.isInteger(value)) return String(value);
  if (value !== 0 && Math.abs(value) < 10 ** -digits) return value.toExponential(2);
  return value.toFixed(digits);
}

export function percent(share, digits = 1) {
  if (typeof share !== "number" || !Number.isFinite(share)) return "n/a";
  return `${(share * 100).toFixed(digits)} %`;
}

export function ordinal(n) {
  const suffixes = { one: "st", two: "nd", few: "rd", other: "th" };
  return `${n}${suffixes[new Intl.PluralRules("en", { type: "ordinal" }).select(n)]}`;
}

export function duration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "none";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

export function clockTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleTimeString();
}

export function dateTime(epochSeconds) {
  return new Date(epochSeconds * 1000).toLocaleString();
}

const SCORE_NAMES = {
  max_probability: "confidence (max probability)",
  margin: "margin (top two classes)",
  entropy: "entropy",
  energy: "energy",
  novelty: "novelty (distance to the reference)",
};

export function scoreName(score) {
  return SCORE_NAMES[score] ?? score.replaceAll("_", " ");
}

export function table(caption, headers, rows, { captionHidden = false } = {}) {
  return el(
    "table",
    {},
    el("caption", { class: captionHidden ? "visually-hidden" : null }, caption),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows),
  );
}
