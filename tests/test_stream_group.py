"""The round loop and stream discovery the selector and drift workers share (no Redis)."""

from __future__ import annotations

import logging
import threading

import pytest

from service.stream_group import StreamDiscovery, round_over

LOGGER = logging.getLogger("test")


class RecordingStop(threading.Event):
    """A stop event that records how long the round asked to wait, without waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return False


def rounds(
    counts: dict[str, int], block: bool
) -> tuple[int, list[tuple[str, bool]], list[float | None]]:
    calls: list[tuple[str, bool]] = []

    def process(stream: str, blocks: bool) -> int:
        calls.append((stream, blocks))
        return counts[stream]

    stop = RecordingStop()
    total = round_over(list(counts), process, block, stop, block_ms=250)
    return total, calls, stop.waits


def test_a_lone_idle_stream_blocks_in_redis_and_the_round_does_not_wait() -> None:
    assert rounds({"a": 0}, block=True) == (0, [("a", True)], [])


@pytest.mark.parametrize("counts", [{"a": 0, "b": 0}, {}])
def test_an_idle_round_over_several_or_no_streams_waits_instead_of_spinning(
    counts: dict[str, int],
) -> None:
    total, calls, waits = rounds(counts, block=True)
    assert total == 0 and waits == [0.25]
    assert calls == [(stream, False) for stream in counts]  # none blocks the others


def test_a_busy_round_or_a_burst_does_not_wait() -> None:
    assert rounds({"a": 3, "b": 0}, block=True) == (3, [("a", False), ("b", False)], [])
    assert rounds({"a": 0, "b": 0}, block=False) == (0, [("a", False), ("b", False)], [])


def test_discovery_asks_the_repository_once_per_interval_for_unknown_streams() -> None:
    now = [100.0]
    asked: list[set[tuple[str, str]]] = []
    on_disk = {("digits", "1"), ("digits", "2")}

    def discover(known: set[tuple[str, str]]) -> list[tuple[str, str]]:
        asked.append(set(known))
        return sorted(on_disk - known)

    discovery = StreamDiscovery(discover, 30.0, LOGGER, clock=lambda: now[0])
    assert discovery.new_streams({("digits", "1")}) == []  # not due before one interval
    now[0] = 130.0
    assert discovery.new_streams({("digits", "1")}) == [("digits", "2")]
    assert discovery.new_streams({("digits", "1")}) == []  # due again only at 160
    now[0] = 160.0
    assert discovery.new_streams({("digits", "1"), ("digits", "2")}) == []
    assert asked == [{("digits", "1")}, {("digits", "1"), ("digits", "2")}]


def test_an_unreadable_repository_is_retried_at_the_next_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    results: list[list[str] | Exception] = [OSError("manifest.json: truncated"), ["v2"]]

    def discover(known: set[tuple[str, str]]) -> list[str]:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    discovery = StreamDiscovery(discover, 1.0, LOGGER, clock=lambda: now[0])
    now[0] = 1.0
    with caplog.at_level(logging.WARNING):
        assert discovery.new_streams(set()) == []
    assert "manifest.json: truncated" in caplog.text
    now[0] = 2.0
    assert discovery.new_streams(set()) == ["v2"]


def test_without_a_repository_to_read_nothing_is_discovered() -> None:
    assert StreamDiscovery(None, 0.0, LOGGER).new_streams(set()) == []
