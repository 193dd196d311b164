// Entry point: loads the model catalog, wires the model picker, the notice and the three views,
// and switches views by the URL fragment (#label, #queue, #drift).

import { apiKey, loadCatalog, setApiKey } from "./api.js";
import { DriftView } from "./drift.js";
import { LabelView } from "./label.js";
import { QueueView } from "./queue.js";

const VIEWS = ["label", "queue", "drift"];
const MODEL_KEY = "edgeharvest.console.model";

// Where an API key is typed: opened by its button, or by a request the service refused for
// want of a key (401) or of a role (403).
class KeyPanel {
  constructor() {
    this.panel = document.getElementById("key-panel");
    this.toggle = document.getElementById("key-toggle");
    this.input = document.getElementById("api-key");
    this.reason = document.getElementById("key-reason");
    this.afterSave = () => {};
    this.toggle.addEventListener("click", () => (this.panel.hidden ? this.open("") : this.close()));
    this.panel.addEventListener("submit", (event) => {
      event.preventDefault();
      setApiKey(this.input.value.trim());
      this.close();
      this.afterSave();
    });
    document.getElementById("key-forget").addEventListener("click", () => {
      setApiKey("");
      this.input.value = "";
      this.close();
    });
  }

  open(reason) {
    this.reason.textContent = reason;
    this.input.value = apiKey();
    this.panel.hidden = false;
    this.toggle.setAttribute("aria-expanded", "true");
    this.input.focus();
  }

  close() {
    this.panel.hidden = true;
    this.toggle.setAttribute("aria-expanded", "false");
  }
}

class Notice {
  constructor(keyPanel) {
    this.keyPanel = keyPanel;
    this.box = document.getElementById("notice");
    this.text = document.getElementById("notice-text");
    document.getElementById("notice-close").addEventListener("click", () => this.clear());
  }

  // With the error that caused it, a refusal for want of a key also opens the key panel.
  show(message, error = null) {
    this.text.textContent = message;
    this.box.hidden = false;
    if (error?.needsKey) this.keyPanel.open(`The service answered: ${error.message}`);
  }

  clear() {
    this.box.hidden = true;
    this.text.textContent = "";
  }
}

// The model and version every view works on; version "" is the latest.
class ModelPicker {
  constructor(catalog) {
    this.catalog = catalog;
    this.model = document.getElementById("model");
    this.version = document.getElementById("version");
    this.listeners = [];
    for (const entry of catalog.models) {
      this.model.append(new Option(entry.name, entry.name));
    }
    const saved = JSON.parse(localStorage.getItem(MODEL_KEY) ?? "null");
    if (saved && catalog.models.some((m) => m.name === saved.model)) this.model.value = saved.model;
    this.fillVersions(saved?.version ?? "");
    this.model.addEventListener("change", () => {
      this.fillVersions("");
      this.changed();
    });
    this.version.addEventListener("change", () => this.changed());
  }

  get entry() {
    return this.catalog.models.find((m) => m.name === this.model.value);
  }

  fillVersions(selected) {
    const entry = this.entry;
    this.version.replaceChildren(new Option(`latest (${entry?.default_version ?? "none"})`, ""));
    for (const v of entry?.versions ?? []) this.version.append(new Option(v.version, v.version));
    this.version.value = entry?.versions.some((v) => v.version === selected) ? selected : "";
  }

  changed() {
    localStorage.setItem(MODEL_KEY, JSON.stringify(this.selection));
    for (const listener of this.listeners) listener(this.selection);
  }

  onChange(listener) {
    this.listeners.push(listener);
  }

  get selection() {
    return { model: this.model.value, version: this.version.value };
  }

  // The catalog entry of one served version (the latest for "").
  versionInfo(model, version) {
    const entry = this.catalog.models.find((m) => m.name === model);
    const wanted = version || entry?.default_version;
    return entry?.versions.find((v) => v.version === wanted) ?? null;
  }

  describe({ model, version }) {
    const info = this.versionInfo(model, version);
    return version ? `${model} version ${version}` : `${model}, latest version (${info?.version ?? "?"})`;
  }
}

async function main() {
  const keyPanel = new KeyPanel();
  const notice = new Notice(keyPanel);
  let catalog;
  try {
    catalog = await loadCatalog();
  } catch (error) {
    // Everything starts from the catalog: with a (new) key, start again.
    keyPanel.afterSave = () => location.reload();
    notice.show(`Cannot load the list of models: ${error.message}`, error);
    return;
  }
  keyPanel.afterSave = () => notice.clear();
  if (catalog.models.length === 0) {
    notice.show("This service serves no model.");
    return;
  }
  const picker = new ModelPicker(catalog);
  const views = {
    label: new LabelView(picker, notice, catalog.label_lease_seconds),
    queue: new QueueView(picker, notice),
    drift: new DriftView(picker, notice),
  };
  let current = null;

  function show() {
    const wanted = location.hash.slice(1);
    const name = VIEWS.includes(wanted) ? wanted : "label";
    for (const view of VIEWS) {
      document.getElementById(`view-${view}`).hidden = view !== name;
      const link = document.querySelector(`a[data-view="${view}"]`);
      if (view === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (current && current !== views[name]) current.deactivate();
    current = views[name];
    current.activate();
  }

  picker.onChange(() => current?.selectionChanged());
  window.addEventListener("hashchange", show);
  show();
}

main();
