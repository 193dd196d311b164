// The label view: claim a batch under the labeler's name, show each item the way a person reads
// it, and label, skip or discard it by button or key. The lease of the open item is renewed
// while it is on screen.

import { ApiError, getBlob, modelPath, postJson } from "./api.js";
import { clockTime, el, number, ordinal, percent, scoreName, table } from "./format.js";

const LABELER_KEY = "edgeharvest.console.labeler";
const COUNTS_KEY = "edgeharvest.console.counts";
// Keys that are not class shortcuts: skip, discard, claim.
const RESERVED_KEYS = new Set(["s", "d", "c"]);
const FALLBACK_KEYS = [..."1234567890abefghijklmnopqrtuvwxyz"];
// Rows of a feature table; wider inputs show their first features and say so.
const MAX_FEATURE_ROWS = 256;
const OUTCOME_WORDS = { labeled: "Labeled", skipped: "Skipped", discarded: "Discarded" };

// Class name -> key. A class whose name is one letter or digit gets that key (digit models
// label "3" with 3); the others get the next free digit, then letter. Classes beyond the keys
// available are labeled by button only.
export function shortcutKeys(classNames) {
  const keys = new Map();
  const used = new Set(RESERVED_KEYS);
  for (const name of classNames) {
    const key = name.toLowerCase();
    if (/^[a-z0-9]$/.test(key) && !used.has(key)) {
      keys.set(name, key);
      used.add(key);
    }
  }
  const free = FALLBACK_KEYS.filter((k) => !used.has(k));
  for (const name of classNames) {
    if (!keys.has(name) && free.length > 0) keys.set(name, free.shift());
  }
  return keys;
}

function isTyping(target) {
  return target instanceof Element && target.closest("input, textarea, select, [contenteditable]");
}

function distanceOr(distance, otherwise) {
  return typeof distance === "number" ? `embedding distance ${number(distance)}` : otherwise;
}

function itemPath(item, action) {
  // The item's own version, even if "latest" moved on since the claim.
  const id = encodeURIComponent(item.item_id);
  return `${modelPath(item.model, item.version)}/queue/items/${id}/${action}`;
}

export class LabelView {
  constructor(picker, notice, leaseSeconds) {
    this.picker = picker;
    this.notice = notice;
    // A third of the lease, so two renewals may fail before it runs out; at most a minute.
    this.heartbeatMs = Math.min(60, Math.max(1, leaseSeconds / 3)) * 1000;
    this.active = false;
    this.busy = false;
    this.batch = [];
    this.position = 0;
    this.current = null;
    this.keys = new Map();
    this.timer = null;
    this.imageUrl = null;
    this.counts = JSON.parse(sessionStorage.getItem(COUNTS_KEY) ?? "null") ?? {
      labeled: 0,
      skipped: 0,
      discarded: 0,
    };

    this.labeler = document.getElementById("labeler");
    this.labeler.value = localStorage.getItem(LABELER_KEY) ?? "";
    this.batchSize = document.getElementById("batch-size");
    this.claimButton = document.querySelector("#claim-form button[type=submit]");
    this.itemBox = document.getElementById("item");
    this.title = document.getElementById("item-title");
    this.empty = document.getElementById("label-empty");
    this.lease = document.getElementById("lease");
    this.lastAction = document.getElementById("last-action");
    this.reason = document.getElementById("discard-reason");
    document.getElementById("claim-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.claim();
    });
    document.getElementById("skip").addEventListener("click", () => this.act("skipped"));
    document.getElementById("discard").addEventListener("click", () => this.act("discarded"));
    document.addEventListener("keydown", (event) => this.onKey(event));
    this.showProgress();
  }

  activate() {
    this.active = true;
  }

  deactivate() {
    // The open item stays open (and leased) while another view is looked at.
    this.active = false;
  }

  selectionChanged() {
    // The open batch keeps its model; the next claim uses the new selection.
  }

  onKey(event) {
    if (!this.active || event.defaultPrevented || event.repeat) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (isTyping(event.target)) {
      if (event.key === "Escape") {
        event.target.blur();
        (this.current ? this.title : document.getElementById("main")).focus();
      }
      return;
    }
    const key = event.key.toLowerCase();
    const label = [...this.keys].find(([, k]) => k === key)?.[0];
    if (this.current && key === "s") this.act("skipped");
    else if (this.current && key === "d") this.act("discarded");
    else if (this.current && label !== undefined) this.act("labeled", label);
    else if (!this.current && key === "c") this.claim();
    else return;
    event.preventDefault();
  }

  async claim() {
    const labeler = this.labeler.value.trim();
    if (!labeler) {
      this.notice.show("Type your name first: it is recorded with every label.");
      this.labeler.focus();
      return;
    }
    if (this.busy || this.current) return;
    localStorage.setItem(LABELER_KEY, labeler);
    const selection = this.picker.selection;
    const count = Math.min(100, Math.max(1, Number.parseInt(this.batchSize.value, 10) || 1));
    const path = `${modelPath(selection.model, selection.version)}/queue/claim`;
    this.busy = true;
    let items;
    try {
      ({ items } = await postJson(path, { labeler, count }));
    } catch (error) {
      this.notice.show(`Could not claim items: ${error.message}`, error);
      return;
    } finally {
      this.busy = false;
    }
    this.notice.clear();
    if (items.length === 0) {
      const what = this.picker.describe(selection);
      this.empty.textContent = `The queue of ${what} is empty: nothing to label right now.`;
      return;
    }
    this.batch = items;
    this.position = 0;
    this.batchLabeler = labeler;
    this.open(items[0]);
    this.title.focus();
  }

  open(item) {
    this.stopHeartbeat();
    this.current = item;
    this.keys = shortcutKeys(item.class_names);
    this.reason.value = "";
    this.render(item);
    this.empty.hidden = true;
    this.itemBox.hidden = false;
    this.showProgress();
    this.heartbeat(item);
    this.timer = setInterval(() => this.heartbeat(item), this.heartbeatMs);
  }

  close() {
    this.stopHeartbeat();
    this.releaseImage();
    this.current = null;
    this.itemBox.hidden = true;
    this.empty.hidden = false;
    this.empty.textContent = "Batch done. Claim the next one with the button or c.";
    this.showProgress();
  }

  stopHeartbeat() {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }

  async heartbeat(item) {
    try {
      const reply = await postJson(itemPath(item, "heartbeat"), { token: item.token });
      if (this.current !== item) return;
      const until = clockTime(reply.expires_at);
      this.lease.textContent = `Your lease on this item runs until ${until}; it is renewed while the item is open.`;
    } catch (error) {
      // While a decision on the item is on its way, its outcome decides what happens next.
      if (this.current !== item || this.busy) return;
      if (error instanceof ApiError && (error.status === 409 || error.status === 404)) {
        this.notice.show(`The lease on item ${item.item_id} ran out and it went back to the queue; moving on.`);
        this.advance();
      } else if (error instanceof ApiError && error.needsKey) {
        this.notice.show(`Could not renew the lease: ${error.message}`, error);
      } else {
        this.lease.textContent = `Could not renew the lease (${error.message}); retrying.`;
      }
    }
  }

  async act(outcome, label) {
    const item = this.current;
    if (!item || this.busy) return;
    const bodies = {
      labeled: { token: item.token, labeler: this.batchLabeler, label },
      skipped: { token: item.token, labeler: this.batchLabeler },
      discarded: { token: item.token, labeler: this.batchLabeler, reason: this.reason.value },
    };
    const actions = { labeled: "label", skipped: "skip", discarded: "discard" };
    this.busy = true;
    this.itemBox.setAttribute("aria-busy", "true");
    try {
      await postJson(itemPath(item, actions[outcome]), bodies[outcome]);
    } catch (error) {
      this.busy = false;
      this.itemBox.removeAttribute("aria-busy");
      if (error instanceof ApiError && error.status === 409) {
        this.notice.show(`Item ${item.item_id}: ${error.message}. Moving on.`);
        this.advance();
      } else {
        this.notice.show(`Item ${item.item_id} is unchanged: ${error.message}`, error);
      }
      return;
    }
    // Counting and opening the next item happen together, so the page never shows a count
    // that does not match the item on screen.
    this.counts[outcome] += 1;
    sessionStorage.setItem(COUNTS_KEY, JSON.stringify(this.counts));
    const as = outcome === "labeled" ? ` as ${label}` : "";
    this.lastAction.textContent = `${OUTCOME_WORDS[outcome]} ${item.item_id}${as}.`;
    this.busy = false;
    this.itemBox.removeAttribute("aria-busy");
    this.notice.clear();
    this.advance();
  }

  advance() {
    this.position += 1;
    if (this.position < this.batch.length) {
      this.open(this.batch[this.position]);
      if (!this.itemBox.contains(document.activeElement)) this.title.focus();
    } else {
      this.close();
    }
  }

  showProgress() {
    // One batch at a time: the next claim waits until this one is decided.
    this.claimButton.disabled = this.current !== null;
    for (const [outcome, count] of Object.entries(this.counts)) {
      document.getElementById(`count-${outcome}`).textContent = String(count);
    }
    document.getElementById("batch-position").textContent = this.current
      ? `Item ${this.position + 1} of ${this.batch.length} in this batch.`
      : "";
  }

  render(item) {
    this.itemBox.dataset.itemId = item.item_id;
    const position = `Item ${this.position + 1} of ${this.batch.length}: `;
    this.title.replaceChildren(position, el("code", {}, item.item_id));
    const made = clockTime(item.created_at);
    document.getElementById("item-meta").textContent =
      `${item.model} version ${item.version}, queued from a prediction made ${made}`;
    document.getElementById("item-input").replaceChildren(this.renderInput(item));
    document.getElementById("item-prediction").replaceChildren(...this.renderPrediction(item));
    document.getElementById("item-why").replaceChildren(...this.renderWhy(item));
    const guess = item.predicted.class_name;
    document.getElementById("class-buttons").replaceChildren(
      ...item.class_names.map((name) => {
        const key = this.keys.get(name);
        return el(
          "button",
          {
            type: "button",
            class: name === guess ? "class-button predicted" : "class-button",
            "aria-keyshortcuts": key,
            "aria-describedby": name === guess ? "predicted-note" : null,
            onclick: () => this.act("labeled", name),
          },
          el("span", { class: "class-name" }, name),
          key ? el("kbd", {}, key) : null,
        );
      }),
      el("p", { id: "predicted-note", class: "help" }, `Outlined: the model's guess (${guess}).`),
    );
  }

  renderInput(item) {
    const input = item.input;
    if (input.values === null) {
      return el(
        "p",
        {},
        "The input was not stored with this prediction (input sampling is on), so it cannot be " +
          "shown. Skip it, or discard it if such items should not be labeled.",
      );
    }
    const layout = input.layout ?? {};
    if (layout.kind === "image" && layout.image_shape) {
      const shape = layout.image_shape;
      const range = layout.value_range;
      const scale = range ? `, values ${range[0]} (black) to ${range[1]} (white)` : "";
      const image = el("img", { alt: `The input as a ${shape.join(" by ")} pixel image, enlarged` });
      this.loadImage(item, image);
      return el("figure", { class: "input-image" }, image, el("figcaption", {}, `${shape.join(" × ")} pixels${scale}`));
    }
    return this.renderFeatures(item);
  }

  async loadImage(item, image) {
    let blob;
    try {
      blob = await getBlob(itemPath(item, "input.png"));
    } catch (error) {
      if (this.current !== item) return;
      image.replaceWith(el("p", {}, `The image could not be loaded: ${error.message}`));
      if (error instanceof ApiError && error.needsKey) this.notice.show(error.message, error);
      return;
    }
    if (this.current !== item) return;
    this.releaseImage();
    this.imageUrl = URL.createObjectURL(blob);
    image.src = this.imageUrl;
  }

  releaseImage() {
    if (this.imageUrl !== null) URL.revokeObjectURL(this.imageUrl);
    this.imageUrl = null;
  }

  renderFeatures(item) {
    const ranges = this.picker.versionInfo(item.model, item.version)?.feature_ranges ?? [];
    const values =
      item.input.features ??
      item.input.values.flat(Infinity).map((value, i) => ({ name: ranges[i]?.name ?? `x${i}`, value }));
    const rows = values.slice(0, MAX_FEATURE_ROWS).map((feature, i) => {
      const range = ranges[i];
      let where = range ? "within" : "n/a";
      if (range?.p1 != null && feature.value < range.p1) where = "below the reference range";
      if (range?.p99 != null && feature.value > range.p99) where = "above the reference range";
      return el(
        "tr",
        { class: where.endsWith("range") ? "outside" : null },
        el("th", { scope: "row" }, feature.name),
        el("td", { class: "num" }, number(feature.value)),
        el("td", {}, range ? `${number(range.p1)} to ${number(range.p99)}` : "n/a"),
        el("td", {}, where),
      );
    });
    const [low, high] = this.picker.catalog.range_percentiles;
    const caption = `Features, with the reference range (${ordinal(low)} to ${ordinal(high)} percentile)`;
    return el(
      "div",
      { class: "scroll" },
      table(caption, ["feature", "value", "reference range", "where"], rows),
      values.length > MAX_FEATURE_ROWS
        ? el("p", { class: "help" }, `First ${MAX_FEATURE_ROWS} of ${values.length} features.`)
        : null,
    );
  }

  renderPrediction(item) {
    const rows = item.top_classes.map((c) =>
      el(
        "li",
        {},
        el("span", { class: "class-name" }, c.class_name),
        el(
          "span",
          { class: "bar", "aria-hidden": "true" },
          el("span", { style: `width: ${(c.probability * 100).toFixed(1)}%` }),
        ),
        el("span", { class: "probability" }, percent(c.probability)),
      ),
    );
    return [
      el("p", { class: "predicted-class" }, "Predicted class ", el("strong", {}, item.predicted.class_name)),
      el("h5", { id: "top-classes-title" }, "Top classes"),
      el("ol", { class: "top-classes", "aria-labelledby": "top-classes-title" }, rows),
    ];
  }

  renderWhy(item) {
    const reasons = item.reasons ?? {};
    const flags = Object.entries(reasons.flags ?? {})
      .filter(([, on]) => on)
      .map(([flag]) => flag.replaceAll("_", " "));
    if (reasons.junk) flags.push("probably junk (beyond the 99.9th novelty percentile)");
    const scores = reasons.scores ?? {};
    const percentiles = reasons.percentiles ?? {};
    const rows = Object.keys(scores).map((score) =>
      el(
        "tr",
        {},
        el("th", { scope: "row" }, scoreName(score)),
        el("td", { class: "num" }, number(scores[score])),
        el("td", { class: "num" }, score in percentiles ? number(percentiles[score], 1) : "n/a"),
      ),
    );
    const fact = (term, value) => el("div", {}, el("dt", {}, term), el("dd", {}, value));
    return [
      el(
        "dl",
        { class: "facts" },
        fact("Lane", item.lane),
        fact("Rule", item.rule),
        fact("Flags", flags.length ? flags.join(", ") : "none"),
        fact(
          "Nearest labeled neighbour",
          distanceOr(item.nearest_labeled_distance, "none: nothing was labeled when it was queued"),
        ),
        "nearest_known_distance" in reasons
          ? fact(
              "Nearest queued or labeled item",
              distanceOr(reasons.nearest_known_distance, "none: it was the first"),
            )
          : null,
      ),
      rows.length
        ? table("Scores, with their percentile in the reference data", ["score", "value", "percentile"], rows)
        : null,
      el("details", {}, el("summary", {}, "All evidence"), el("pre", {}, JSON.stringify(reasons, null, 2))),
    ];
  }
}
