"""Multiprocess metric files of worker processes that died (no Redis, no server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.shared_metrics import forget_dead_processes


def test_a_dead_workers_live_gauges_go_and_its_counters_stay(tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = int(finished.stdout)
    alive = os.getppid()  # the process that started this test's interpreter runs
    names = [
        f"gauge_livesum_{dead}.db",
        f"gauge_livemax_{dead}.db",
        f"counter_{dead}.db",
        f"histogram_{dead}.db",
        f"gauge_livesum_{alive}.db",
        f"gauge_livesum_{os.getpid()}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")

    assert forget_dead_processes(str(tmp_path)) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            f"counter_{dead}.db",
            f"histogram_{dead}.db",
            f"gauge_livesum_{alive}.db",
            f"gauge_livesum_{os.getpid()}.db",
        ]
    )
    assert forget_dead_processes(str(tmp_path)) == []
