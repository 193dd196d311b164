"""How many newest stream entries hold the newest N events (pure)."""

from __future__ import annotations

import pytest

from service.stream_retention import EntriesForEvents


def test_before_n_events_the_missing_ones_count_as_single_event_entries() -> None:
    window = EntriesForEvents(100)
    assert window.entries() == 100
    window.add([16, 16])
    assert window.entries() == 2 + 68


def test_the_fewest_newest_entries_that_hold_n_events() -> None:
    window = EntriesForEvents(10)
    window.add([1] * 20)
    assert window.entries() == 10
    window.add([4])  # 4 + six of the ones
    assert window.entries() == 7
    window.add([4, 4])  # 4 + 4 + 4 already hold 12 >= 10; two would hold 8
    assert window.entries() == 3
    window.add([1, 1])  # 1 + 1 + 4 + 4 = 10
    assert window.entries() == 4


def test_a_burst_of_full_batches_keeps_the_older_small_entries() -> None:
    """The case a per-write mean gets wrong: 32-event entries after single events."""
    window = EntriesForEvents(1000)
    window.add([1] * 5000)
    window.add([32] * 3)
    assert window.entries() == 3 + (1000 - 96)


def test_events_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EntriesForEvents(0)
