"""Evidently's default DataDriftPreset on windows of inputs: run by bench/drift_detection.py.

Runs under a separate interpreter that has Evidently (`pip install evidently`), never the
service's environment: `python bench/evidently_windows.py WINDOWS.npz WINDOW_SIZE` reads the
`reference` array and one array of rows per scenario, and prints, per scenario, whether each
consecutive window of WINDOW_SIZE rows drifted by the preset's default rule (at least half of
the columns drifted, each by the test Evidently picks for its type and size).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset


def frame(rows: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[f"pixel_{i}" for i in range(rows.shape[1])])


def dataset_drift(reference: pd.DataFrame, window: pd.DataFrame) -> bool:
    snapshot = Report([DataDriftPreset()]).run(current_data=window, reference_data=reference)
    for metric in snapshot.dict()["metrics"]:
        if metric["config"]["type"].endswith("DriftedColumnsCount"):
            return bool(metric["value"]["share"] >= metric["config"]["drift_share"])
    raise RuntimeError("DataDriftPreset reported no DriftedColumnsCount")


def main() -> None:
    data = np.load(sys.argv[1])
    size = int(sys.argv[2])
    reference = frame(data["reference"])
    result = {}
    for name in data.files:
        if name == "reference":
            continue
        rows = data[name]
        result[name] = [
            dataset_drift(reference, frame(rows[start : start + size]))
            for start in range(0, len(rows) - size + 1, size)
        ]
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
