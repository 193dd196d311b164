"""Every Redis key name, in one place.

All keys of one model share the hash tag `{<model name>}` so that, on a Redis Cluster, they live
in one slot and multi-key operations and transactions on one model stay legal. Model names are
validated by the manifest (letters, digits, `_.-`), so they never contain braces.
"""

from __future__ import annotations

PREFIX = "edgeharvest"


def model_tag(model: str) -> str:
    return f"{{{model}}}"


def event_stream(model: str, version: str) -> str:
    """The Redis Stream of prediction events of one model version."""
    return f"{PREFIX}:{model_tag(model)}:{version}:events"


def selector_budget(model: str, version: str, window_start: int, lane: str = "") -> str:
    """Items the selectors enqueued in the budget window starting at `window_start` (in one
    lane, when `lane` is given)."""
    suffix = f":{lane}" if lane else ""
    return f"{PREFIX}:{model_tag(model)}:{version}:budget:{window_start}{suffix}"


# ---- labeling queue: every queue key sits under `...:<version>:queue` ------------------------


def label_queue(model: str, version: str) -> str:
    """Sorted set of queued item ids, best first (score and member layout: see label_queue.py)."""
    return f"{PREFIX}:{model_tag(model)}:{version}:queue"


def label_queue_leases(model: str, version: str) -> str:
    """Sorted set of leased item ids scored by lease expiry."""
    return f"{label_queue(model, version)}:leases"


def label_queue_records(model: str, version: str) -> str:
    """Hash: item id -> JSON lifecycle record (state, lease, label, history)."""
    return f"{label_queue(model, version)}:records"


def label_queue_since(model: str, version: str) -> str:
    """Sorted set of queued item ids scored by first enqueue time (oldest queued item)."""
    return f"{label_queue(model, version)}:since"


def label_queue_depth_by_lane(model: str, version: str) -> str:
    """Hash: lane -> number of queued items."""
    return f"{label_queue(model, version)}:depth:lane"


def label_queue_depth_by_class(model: str, version: str) -> str:
    """Hash: predicted class name -> number of queued items."""
    return f"{label_queue(model, version)}:depth:class"


def label_queue_labeled(model: str, version: str) -> str:
    """Sorted set of labeled item ids scored by label time."""
    return f"{label_queue(model, version)}:labeled"


def label_queue_discarded(model: str, version: str) -> str:
    """Set of discarded item ids."""
    return f"{label_queue(model, version)}:discarded"


def label_queue_content_hashes(model: str, version: str) -> str:
    """Set of the content hashes of every item ever enqueued: never enqueued twice."""
    return f"{label_queue(model, version)}:hashes"


def label_queue_sequence(model: str, version: str) -> str:
    """Counter of enqueued items: breaks priority ties in enqueue order."""
    return f"{label_queue(model, version)}:seq"


def label_queue_item(model: str, version: str, item_id: str) -> str:
    """Hash of one item's immutable content: `meta` (JSON), `input`, `embedding` (bytes)."""
    return f"{label_queue(model, version)}:item:{item_id}"


# ---- drift worker: every drift key sits under `...:<version>:drift` --------------------------


def drift_prefix(model: str, version: str) -> str:
    return f"{PREFIX}:{model_tag(model)}:{version}:drift"


def drift_buffer(model: str, version: str) -> str:
    """Hash: event id -> packed event, the events not yet in a closed window (all workers')."""
    return f"{drift_prefix(model, version)}:buffer"


def drift_state(model: str, version: str) -> str:
    """JSON: the next window's index, alarm streaks and counts; changed only by compare-and-set."""
    return f"{drift_prefix(model, version)}:state"


def drift_streaming(model: str, version: str) -> str:
    """JSON: the Page-Hinkley detectors' running state; changed only by compare-and-set."""
    return f"{drift_prefix(model, version)}:streaming"


def drift_history(model: str, version: str) -> str:
    """List of window reports (JSON), newest first, trimmed to the configured history size."""
    return f"{drift_prefix(model, version)}:history"
