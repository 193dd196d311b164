// The queue view: depth by lane and class, the oldest item's age and the labeling rate, refreshed
// while the view is open.

import { getJson, modelPath } from "./api.js";
import { clockTime, duration, el, table } from "./format.js";
import { RefreshingView } from "./view.js";

const REFRESH_MS = 10_000;
const LANES = {
  uncertain: "the model hesitated (low margin or high entropy)",
  novel: "far from anything in the reference data",
  random: "a uniform sample, so the labeled set keeps an unbiased part",
};

// Known names first, in their order; any other name after them, sorted.
function ordered(counts, order) {
  const known = order.filter((name) => name in counts);
  const others = Object.keys(counts).filter((name) => !order.includes(name)).sort();
  return [...known, ...others];
}

function countsTable(caption, label, counts, order, describe = () => undefined) {
  const names = ordered(counts, order);
  if (names.length === 0) return el("p", { class: "empty" }, "Nothing queued.");
  const top = Math.max(...Object.values(counts), 1);
  const rows = names.map((name) =>
    el(
      "tr",
      {},
      el("th", { scope: "row" }, name, describe(name) ? el("span", { class: "help" }, ` ${describe(name)}`) : null),
      el("td", { class: "num" }, String(counts[name])),
      el(
        "td",
        { class: "bar-cell", "aria-hidden": "true" },
        el("span", { class: "bar" }, el("span", { style: `width: ${((100 * counts[name]) / top).toFixed(1)}%` })),
      ),
    ),
  );
  const headers = [label, "queued", el("span", { class: "visually-hidden" }, "share")];
  return table(caption, headers, rows, { captionHidden: true });
}

export class QueueView extends RefreshingView {
  constructor(picker, notice) {
    super(picker, notice, "queue-refresh", REFRESH_MS);
  }

  async refresh() {
    const selection = this.picker.selection;
    const generation = ++this.generation;
    let stats;
    try {
      stats = await getJson(`${modelPath(selection.model, selection.version)}/queue/stats`);
    } catch (error) {
      this.notice.show(`Could not read the queue of ${selection.model}: ${error.message}`, error);
      return;
    }
    if (generation !== this.generation) return; // a newer refresh is under way
    const set = (id, text) => {
      document.getElementById(id).textContent = text;
    };
    set("queue-updated", `${this.picker.describe(selection)}, as of ${clockTime(Date.now() / 1000)}`);
    set("stat-queued", String(stats.queued));
    set("stat-leased", String(stats.leased));
    set("stat-labeled", String(stats.labeled));
    set("stat-discarded", String(stats.discarded));
    set("stat-expired", String(stats.expired_leases));
    const oldest = stats.oldest_queued_age_seconds;
    set("stat-oldest", oldest === null ? "none queued" : duration(oldest));
    set("stat-rate", String(stats.labeled_last_hour));
    const classes = this.picker.versionInfo(selection.model, selection.version)?.class_names ?? [];
    document
      .getElementById("queue-lanes")
      .replaceChildren(
        countsTable("Queued items by lane", "lane", stats.queued_by_lane, Object.keys(LANES), (l) => LANES[l]),
      );
    document
      .getElementById("queue-classes")
      .replaceChildren(countsTable("Queued items by predicted class", "class", stats.queued_by_class, classes));
  }
}
