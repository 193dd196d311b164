"""The browser console end to end: a real server process, a real Redis, a real headless Chromium.

Chromium is Debian's `chromium` package (`.ci/run` installs it), driven by Playwright with the
system browser: nothing is downloaded at test time. Without it these tests fail, they do not
skip. Set EDGEHARVEST_SCREENSHOT_DIR=docs/screenshots to refresh the README's screenshots;
otherwise they go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from sklearn.datasets import load_iris

from service.auth import hash_key, new_api_key
from service.events import decode_entry
from service.redis_keys import event_stream
from service.selection_policy import SelectionConfig, WindowBudget
from service.selector_worker import ModelStream, SelectorWorker
from service.worker_metrics import WorkerMetrics
from tests.model_factories import IRIS_CLASS_NAMES, IRIS_MODEL_NAME
from tests.redis_server import RedisServer
from tests.support import MODELS_DIR, REPO_ROOT, start_server
from tests.test_console_catalog import build_console_models
from tests.test_drift_worker import in_distribution, noise
from tests.test_drift_worker import make_worker as make_drift_worker
from tests.test_selector_worker import make_worker as make_selector
from tests.test_selector_worker import traffic

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError as exc:  # a failure with the fix, not a skip
    raise ImportError(
        "the console tests drive Chromium with Playwright: pip install -e '.[dev]'"
    ) from exc

CHROMIUM = Path("/usr/bin/chromium")
LAPTOP = {"width": 1280, "height": 900}
TABLET = {"width": 768, "height": 1024}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("EDGEHARVEST_SCREENSHOT_DIR")
    folder = REPO_ROOT / configured if configured else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service as `edgeharvest serve` runs it, with digits (image) and iris (tabular)."""
    models = build_console_models(tmp_path_factory.mktemp("console-models"))
    process, base_url = start_server(models, {"EDGEHARVEST_REDIS_URL": redis_server.url})
    try:
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the console tests need Debian's chromium package "
            "(apt-get install -y chromium; .ci/run installs it)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def console_page(browser: Browser, server: str) -> Iterator[Page]:
    """A fresh browser context (no stored name, key or counts) on the server."""
    context = browser.new_context(base_url=server, viewport=LAPTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"JavaScript errors in the console: {errors}"


@pytest.fixture
def page(browser: Browser, server: str) -> Iterator[Page]:
    with console_page(browser, server) as page:
        yield page


def send(
    server: str, redis_url: str, model: str, rows: np.ndarray, headers: dict[str, str] | None = None
) -> None:
    """Predictions through the live server, then wait until its event log wrote them all."""
    with httpx.Client(base_url=server, timeout=30, headers=headers) as client:
        for start in range(0, len(rows), 100):
            response = client.post(
                f"/v1/models/{model}/predict",
                json={"instances": rows[start : start + 100].tolist()},
            )
            assert response.status_code == 200, response.text
    with redis.Redis.from_url(redis_url) as r:
        deadline = time.monotonic() + 30  # only guards against hanging
        while logged_events(r, model) < len(rows):
            assert time.monotonic() < deadline, "the server did not log every event"
            time.sleep(0.05)


def logged_events(r: redis.Redis, model: str) -> int:
    return sum(len(decode_entry(f)) for _, f in r.xrange(event_stream(model, "1")))


def accessibility_problems(page: Page) -> list[str]:
    """Form controls without an accessible name, images without alt text, positive tabindex."""
    problems: list[str] = page.evaluate(
        """() => {
          const problems = [];
          for (const c of document.querySelectorAll("input, select, button")) {
            if (c.closest("[hidden]")) continue;
            const named = c.labels?.length || c.getAttribute("aria-label") ||
              c.getAttribute("aria-labelledby") || c.textContent.trim();
            if (!named) problems.push(`unnamed ${c.tagName} ${c.id}`);
          }
          for (const img of document.querySelectorAll("img")) {
            if (!img.getAttribute("alt")) problems.push(`image without alt: ${img.src}`);
          }
          for (const e of document.querySelectorAll("[tabindex]")) {
            if (e.tabIndex > 0) problems.push(`positive tabindex on ${e.id}`);
          }
          return problems;
        }"""
    )
    return problems


def shown(value: float) -> str:
    """A number as the console prints it (three decimals; whole numbers without)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def fits_width(page: Page) -> bool:
    return bool(page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"))


def test_a_labeler_labels_skips_and_discards_by_keyboard(
    page: Page, server: str, redis_url: str, screenshots: Path
) -> None:
    send(server, redis_url, "digits", traffic(seed=3))
    with redis.Redis.from_url(redis_url) as r:
        make_selector(r, budget=40).run(burst=True)
    queue = f"{server}/v1/models/digits/queue"
    before = httpx.get(f"{queue}/stats").json()
    assert before["queued"] >= 5 and before["labeled"] == 0

    page.goto("/console/")
    expect(page.get_by_role("link", name="Label")).to_have_attribute("aria-current", "page")
    page.get_by_label("Your name").fill("alice")
    page.get_by_label("Model", exact=True).select_option("digits")
    page.get_by_label("Items per batch").fill("5")
    item = page.locator("#item")
    # Opening an item renews its lease at once, and then every third of the lease.
    with page.expect_response(lambda r: r.url.endswith("/heartbeat")) as heartbeat:
        page.get_by_role("button", name="Claim batch").click()
    assert heartbeat.value.status == 200
    expect(item).to_be_visible()
    expect(page.locator("#lease")).to_contain_text("Your lease on this item runs until")
    image = item.get_by_role("img", name="The input as a 8 by 8 pixel image, enlarged")
    expect(image).to_have_js_property("naturalWidth", 128)  # the PNG loaded: 8 px x 16
    expect(item.get_by_role("heading", name="Why it was flagged")).to_be_visible()
    expect(item.get_by_role("table", name="Scores, with their percentile")).to_be_visible()
    first_rule = page.locator("#item-why dd").nth(1).inner_text()
    assert "percentile" in first_rule
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshots / "label.png", full_page=True)

    labeled = []
    for count, key in enumerate(["7", "1", "4"], start=1):
        item_id = item.get_attribute("data-item-id")
        page.keyboard.press(key)
        expect(page.locator("#count-labeled")).to_have_text(str(count))
        labeled.append((item_id, key))
    skipped = item.get_attribute("data-item-id")
    page.keyboard.press("s")
    expect(page.locator("#count-skipped")).to_have_text("1")
    discarded = item.get_attribute("data-item-id")
    page.keyboard.press("d")
    expect(page.locator("#count-discarded")).to_have_text("1")
    expect(item).to_be_hidden()
    expect(page.locator("#label-empty")).to_have_text(
        "Batch done. Claim the next one with the button or c."
    )
    assert len({*(i for i, _ in labeled), skipped, discarded}) == 5

    after = httpx.get(f"{queue}/stats").json()
    # The skipped item is back in the queue; the labeled and the discarded left it.
    assert after["queued"] == before["queued"] - 4
    assert after["leased"] == 0 and after["labeled"] == 3 and after["discarded"] == 1
    assert after["labeled_last_hour"] == 3
    exported = [json.loads(line) for line in httpx.get(f"{queue}/export.jsonl").text.splitlines()]
    assert [(e["item_id"], e["label"], e["labeler"]) for e in exported] == [
        (item_id, label, "alice") for item_id, label in labeled
    ]
    state = httpx.get(f"{queue}/items/{skipped}").json()
    assert state["state"] == "queued" and state["skipped_by"] == ["alice"]
    state = httpx.get(f"{queue}/items/{discarded}").json()
    assert state["state"] == "discarded" and state["discard"]["labeler"] == "alice"

    page.get_by_role("link", name="Queue").click()
    expect(page.locator("#stat-labeled")).to_have_text("3")
    expect(page.locator("#stat-discarded")).to_have_text("1")
    expect(page.locator("#stat-queued")).to_have_text(str(after["queued"]))
    expect(page.locator("#stat-rate")).to_have_text("3")
    lanes = page.get_by_role("table", name="Queued items by lane")
    for lane, count in after["queued_by_lane"].items():
        expect(lanes.get_by_role("row", name=lane)).to_contain_text(str(count))
    classes = page.get_by_role("table", name="Queued items by predicted class")
    expect(classes.locator("tbody tr")).to_have_count(len(after["queued_by_class"]))
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshots / "queue.png", full_page=True)
    page.set_viewport_size(TABLET)
    assert fits_width(page)


def test_a_tabular_item_is_a_table_with_reference_ranges(
    page: Page, server: str, redis_url: str, screenshots: Path
) -> None:
    features, _ = load_iris(return_X_y=True)
    send(server, redis_url, IRIS_MODEL_NAME, features.astype(np.float32))
    with redis.Redis.from_url(redis_url) as r:
        SelectorWorker(
            r,
            [ModelStream(IRIS_MODEL_NAME, "1", IRIS_CLASS_NAMES)],
            consumer="test",
            config=SelectionConfig(),
            budget=WindowBudget(20, 3600),
            metrics=WorkerMetrics(CollectorRegistry()),
            round_size=200,
            seed=0,
        ).run(burst=True)
    page.set_viewport_size(TABLET)
    page.goto("/console/#label")
    page.get_by_label("Your name").fill("bob")
    page.get_by_label("Model", exact=True).select_option(IRIS_MODEL_NAME)
    page.get_by_label("Items per batch").fill("1")
    page.get_by_role("button", name="Claim batch").click()
    table = page.get_by_role(
        "table", name="Features, with the reference range (1st to 99th percentile)"
    )
    expect(table.locator("tbody tr")).to_have_count(4)
    catalog = httpx.get(f"{server}/v1/console/models").json()
    iris = next(m for m in catalog["models"] if m["name"] == IRIS_MODEL_NAME)
    for feature in iris["versions"][0]["feature_ranges"]:
        expect(table.get_by_role("row", name=feature["name"])).to_contain_text(
            f"{shown(feature['p1'])} to {shown(feature['p99'])}"
        )
    # Classes that are not single characters get the digits 1, 2, 3 in order.
    for key, name in zip("123", IRIS_CLASS_NAMES, strict=True):
        expect(page.get_by_role("button", name=f"{name} {key}")).to_have_attribute(
            "aria-keyshortcuts", key
        )
    assert fits_width(page)
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshots / "label-tabular-tablet.png", full_page=True)
    item_id = page.locator("#item").get_attribute("data-item-id")
    page.keyboard.press("2")
    expect(page.locator("#label-empty")).to_contain_text("Batch done")
    labeled = httpx.get(f"{server}/v1/models/{IRIS_MODEL_NAME}/queue/items/{item_id}").json()
    assert labeled["state"] == "labeled" and labeled["label"]["label"] == "versicolor"
    assert labeled["label"]["labeler"] == "bob"


def test_the_drift_view_shows_a_drifting_window(
    page: Page, server: str, redis_url: str, screenshots: Path
) -> None:
    send(server, redis_url, "digits", np.concatenate([in_distribution(500), noise(500)]))
    with redis.Redis.from_url(redis_url) as r:
        assert make_drift_worker(r).run(burst=True) == 10  # stream entries, one per request
    summary = httpx.get(f"{server}/v1/models/digits/drift").json()
    assert summary["latest"]["index"] == 3 and summary["latest"]["alarm"] is True

    page.goto("/console/#drift")
    state = page.locator("#drift-state")
    expect(state).to_contain_text("Alarm: window #3 drifted again for")
    expect(state).to_contain_text("scores:novelty")
    expect(page.locator("#drift-windows")).to_have_text("4")
    expect(page.locator("#drift-events")).to_have_text("1000")
    windows = page.get_by_role("table", name="The latest windows, newest first")
    rows = windows.locator("tbody tr")
    expect(rows).to_have_count(4)
    # Newest first: two noise windows (the second in alarm), then two quiet ones.
    for row, text in zip(range(4), ["Alarm", "Drifting", "No drift", "No drift"], strict=True):
        expect(rows.nth(row).locator(".badge")).to_have_text(text)
    for title in ["confidence (max probability)", "novelty (distance to the reference)"]:
        chart = page.get_by_role("img", name=f"{title}: reference versus window")
        expect(chart).to_be_visible()
        expect(chart.locator("rect.window")).to_have_count(20)
    tests = page.get_by_role("table", name="Tests of window #3 against the reference")
    expect(tests.get_by_role("row", name="scores:novelty")).to_contain_text("ALARM")
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshots / "drift.png", full_page=True)

    # An older window's details, on request; the quiet window's histograms overlap.
    windows.get_by_role("button", name="Show #0").click()
    expect(page.get_by_role("heading", name="Window #0: 250 events, no drift")).to_be_visible()
    expect(
        page.get_by_role("table", name="Tests of window #0 against the reference").get_by_role(
            "row", name="scores:novelty"
        )
    ).to_contain_text("no")
    page.set_viewport_size(TABLET)
    assert fits_width(page)


def test_with_api_keys_the_console_asks_for_one_and_sends_it(
    browser: Browser, redis_server: RedisServer, redis_url: str
) -> None:
    label_key, admin_key = new_api_key(), new_api_key()
    keys = [
        {"name": "labeling-team", "sha256": hash_key(label_key), "roles": ["label"]},
        {"name": "ops", "sha256": hash_key(admin_key), "roles": ["admin"]},
    ]
    process, server = start_server(
        MODELS_DIR,
        {"EDGEHARVEST_REDIS_URL": redis_server.url, "EDGEHARVEST_API_KEYS": json.dumps(keys)},
    )
    admin = {"Authorization": f"Bearer {admin_key}"}
    try:
        send(server, redis_url, "digits", traffic(seed=3)[:300], headers=admin)
        with redis.Redis.from_url(redis_url) as r:
            make_selector(r, budget=10).run(burst=True)
        # The page itself is open; the data behind it is not.
        assert httpx.get(f"{server}/console/").status_code == 200
        assert httpx.get(f"{server}/v1/console/models").status_code == 401

        with console_page(browser, server) as page:
            page.goto("/console/")
            expect(page.locator("#notice")).to_contain_text("Cannot load the list of models")
            expect(page.locator("#key-reason")).to_contain_text("this endpoint needs an API key")
            key_field = page.get_by_label("API key", exact=True)
            expect(key_field).to_be_focused()
            key_field.fill(label_key)
            page.get_by_role("button", name="Use this key").click()
            page.get_by_label("Your name").fill("ana")
            page.get_by_label("Items per batch").fill("1")
            page.get_by_role("button", name="Claim batch").click()
            # The PNG is fetched with the key too (an <img src> could not send it).
            image = page.get_by_role("img", name="The input as a 8 by 8 pixel image, enlarged")
            expect(image).to_have_js_property("naturalWidth", 128)
            item_id = page.locator("#item").get_attribute("data-item-id")
            page.keyboard.press("5")
            expect(page.locator("#count-labeled")).to_have_text("1")
        item = httpx.get(f"{server}/v1/models/digits/queue/items/{item_id}", headers=admin)
        label = item.json()["label"]
        assert (label["label"], label["labeler"]) == ("5", "ana")
    finally:
        process.terminate()
        process.wait(timeout=30)
