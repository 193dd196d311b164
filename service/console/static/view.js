// What the queue and drift views share: refresh on show, every `refreshMs` while shown (not
// while the tab is hidden), on their Refresh button, and when the model or version changes.

export class RefreshingView {
  constructor(picker, notice, refreshButtonId, refreshMs) {
    this.picker = picker;
    this.notice = notice;
    this.refreshMs = refreshMs;
    this.timer = null;
    this.generation = 0;
    document.getElementById(refreshButtonId).addEventListener("click", () => this.refresh());
  }

  activate() {
    this.refresh();
    this.timer = setInterval(() => {
      if (!document.hidden) this.refresh();
    }, this.refreshMs);
  }

  deactivate() {
    clearInterval(this.timer);
    this.timer = null;
  }

  selectionChanged() {
    this.refresh();
  }
}
