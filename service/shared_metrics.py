"""Prometheus metrics of several API worker processes behind one port.

`edgeharvest serve --workers N` runs N processes that accept on one socket, so a scrape reaches
one of them at random; each process's own counters would be a random share of the truth. The
client library's multiprocess mode is the standard answer: every process writes its samples to
memory-mapped files in one directory (PROMETHEUS_MULTIPROC_DIR, which `serve` sets, fresh,
before the workers start) and the process that answers `/metrics` merges every file. Counters
and histograms are summed over processes (dead ones included, so totals never go backwards when
a worker is replaced); each gauge says how it merges (`multiprocess_mode`).

prometheus_client picks the mode when it is imported, from the environment, so the variable must
be set before a worker process starts; one process with the variable set behaves the same way.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client import values as metric_values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service.processes import process_exists

DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Files of the gauges that count only live processes: `gauge_live<mode>_<pid>.db`.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def multiprocess_mode() -> bool:
    """Whether metric values of this process live in the shared files."""
    return bool(getattr(metric_values.ValueClass, "_multiprocess", False))


def shared_directory() -> str | None:
    """The multiprocess directory, when this process writes its metrics to one."""
    return os.environ.get(DIRECTORY_VARIABLE) if multiprocess_mode() else None


def scrape_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What `/metrics` exposes: this process's registry, or every process's files merged."""
    directory = shared_directory()
    if directory is None:
        return own
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    return merged


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live-gauge files of processes that no longer run (a worker that was killed
    never cleans up after itself); return their pids. Counters and histograms are kept."""
    # One file per live mode and process: gauge_livesum_<pid>.db, gauge_livemax_<pid>.db, ...
    matches = (_LIVE_GAUGE_FILE.fullmatch(p.name) for p in Path(directory).glob("gauge_live*"))
    pids = {int(match.group(1)) for match in matches if match is not None}
    dead = sorted(pid for pid in pids if pid != os.getpid() and not process_exists(pid))
    for pid in dead:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return dead


def process_stopping(directory: str) -> None:
    """This process's live gauges stop counting: it no longer buffers or serves anything."""
    mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]
