// The drift view: the alarm state, the latest windows' tests, and reference-versus-window
// histograms of confidence and novelty for the window picked (the latest by default).

import { getJson, modelPath } from "./api.js";
import { dateTime, el, number, scoreName, table } from "./format.js";
import { histogramFigure } from "./histogram.js";
import { RefreshingView } from "./view.js";

const REFRESH_MS = 15_000;
const WINDOWS_SHOWN = 10;
const MAIN_SCORES = ["max_probability", "novelty"];

function windowState(window) {
  if (window.alarm) return ["alarm", "Alarm"];
  if (window.drifting) return ["drifting", "Drifting"];
  return ["ok", "No drift"];
}

function driftingTests(window) {
  return (window.results ?? []).filter((r) => r.drifting).map((r) => r.test);
}

function stateSentence(summary) {
  const latest = summary.latest;
  if (!summary.has_reference) {
    return ["", "This version has no reference profile: nothing is tested for drift."];
  }
  if (!latest) return ["", "No window evaluated yet."];
  const [kind, text] = windowState(latest);
  const window = `window #${latest.index}`;
  if (kind === "alarm") {
    const alarms = Object.entries(latest.alarms ?? {}).filter(([, on]) => on).map(([test]) => test);
    return [kind, `${text}: ${window} drifted again for ${alarms.join(", ")}.`];
  }
  if (kind === "drifting") {
    const tests = driftingTests(latest).join(", ");
    return [kind, `${text}: ${window} drifted for ${tests} (an alarm needs consecutive windows).`];
  }
  return [kind, `${text}: ${window} matches the reference.`];
}

export class DriftView extends RefreshingView {
  constructor(picker, notice) {
    super(picker, notice, "drift-refresh", REFRESH_MS);
    this.selectedIndex = null;
  }

  selectionChanged() {
    this.selectedIndex = null;
    super.selectionChanged();
  }

  async refresh() {
    const selection = this.picker.selection;
    const generation = ++this.generation;
    let summary;
    try {
      const path = `${modelPath(selection.model, selection.version)}/drift`;
      summary = await getJson(path, { limit: WINDOWS_SHOWN });
    } catch (error) {
      this.notice.show(`Could not read the drift of ${selection.model}: ${error.message}`, error);
      return;
    }
    if (generation !== this.generation) return; // a newer refresh is under way
    this.summary = summary;
    this.render();
  }

  render() {
    const summary = this.summary;
    const set = (id, text) => {
      document.getElementById(id).textContent = text;
    };
    const now = new Date().toLocaleTimeString();
    set("drift-updated", `${summary.model} version ${summary.version}, as of ${now}`);
    set("drift-windows", String(summary.windows_evaluated));
    set("drift-events", String(summary.events_evaluated));
    set("drift-buffered", String(summary.buffered_events));
    set("drift-late", String(summary.late_events));
    const [kind, sentence] = stateSentence(summary);
    const state = document.getElementById("drift-state");
    state.className = kind ? `state state-${kind}` : "state";
    state.textContent = sentence;
    const streaming = Object.entries(summary.streaming ?? {}).map(
      ([score, s]) =>
        `${scoreName(score)} ${s.alarm ? "in alarm" : "quiet"} ` +
        `(${s.detections} detection${s.detections === 1 ? "" : "s"})`,
    );
    set("drift-streaming", streaming.length ? `Event by event (Page-Hinkley): ${streaming.join("; ")}.` : "");

    const history = summary.history ?? [];
    if (!history.some((w) => w.index === this.selectedIndex)) {
      this.selectedIndex = history[0]?.index ?? null;
    }
    document
      .getElementById("drift-windows-table")
      .replaceChildren(history.length ? this.windowsTable(history) : el("p", { class: "empty" }, "No windows yet."));
    const selected = history.find((w) => w.index === this.selectedIndex);
    document.getElementById("drift-window").hidden = !selected;
    if (selected) this.renderWindow(selected);
  }

  windowsTable(history) {
    const rows = history.map((window) => {
      const [kind, text] = windowState(window);
      const shown = window.index === this.selectedIndex;
      const show = () => {
        this.selectedIndex = window.index;
        this.render();
      };
      return el(
        "tr",
        { class: shown ? "selected" : null },
        el("th", { scope: "row" }, `#${window.index}`),
        el("td", { class: "num" }, String(window.size)),
        el("td", {}, window.end_time ? dateTime(window.end_time) : "n/a"),
        el("td", {}, el("span", { class: `badge badge-${kind}` }, text)),
        el("td", {}, driftingTests(window).join(", ") || "none"),
        el(
          "td",
          {},
          el(
            "button",
            { type: "button", "aria-pressed": shown ? "true" : "false", onclick: show },
            `Show #${window.index}`,
          ),
        ),
      );
    });
    const headers = ["window", "events", "ended", "state", "drifting tests", "details"];
    return table("The latest windows, newest first", headers, rows, { captionHidden: true });
  }

  renderWindow(window) {
    const [, text] = windowState(window);
    document.getElementById("window-title").textContent =
      `Window #${window.index}: ${window.size} events, ${text.toLowerCase()}`;
    const histograms = window.histograms ?? {};
    const figure = (score) => histogramFigure(`hist-${score}`, scoreName(score), histograms[score]);
    const main = MAIN_SCORES.filter((s) => s in histograms).map(figure);
    document
      .getElementById("drift-histograms")
      .replaceChildren(...(main.length ? main : [el("p", { class: "empty" }, "No score histograms.")]));
    const others = Object.keys(histograms)
      .filter((s) => !MAIN_SCORES.includes(s))
      .sort();
    document
      .getElementById("drift-other-histograms")
      .replaceChildren(
        others.length
          ? el(
              "details",
              {},
              el("summary", {}, "Other scores"),
              el("div", { class: "histograms" }, others.map(figure)),
            )
          : "",
      );
    const alarms = window.alarms ?? {};
    const rows = (window.results ?? []).map((r) =>
      el(
        "tr",
        { class: r.drifting ? "outside" : null },
        el("th", { scope: "row" }, r.test),
        el("td", { class: "num" }, number(r.statistic, 4)),
        el("td", { class: "num" }, number(r.p_value, 4)),
        el("td", { class: "num" }, `${number(r.effect_size, 4)} (${r.effect_name ?? ""})`),
        el("td", {}, r.drifting ? "yes" : "no"),
        el("td", {}, alarms[r.test] ? "ALARM" : "no"),
      ),
    );
    const headers = ["test", "statistic", "p-value", "effect size", "drifting", "alarm"];
    document
      .getElementById("drift-tests")
      .replaceChildren(table(`Tests of window #${window.index} against the reference`, headers, rows));
  }
}
