"""Read reference data (inputs and optional labels) from .npy, .npz, CSV or Parquet files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

INPUT_KEYS = ("x", "X", "inputs", "data", "features")
LABEL_KEYS = ("y", "Y", "labels", "label", "targets", "target")


class ReferenceDataError(ValueError):
    """The reference data cannot be read or does not fit the model."""


def _from_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as data:
        inputs = next((data[k] for k in INPUT_KEYS if k in data), None)
        if inputs is None:
            raise ReferenceDataError(
                f"{path} holds arrays {sorted(data.files)}; expected the inputs under one of "
                f"{list(INPUT_KEYS)}"
            )
        labels = next((data[k] for k in LABEL_KEYS if k in data), None)
    return inputs, labels


def _split_label_column(
    names: list[str], label_column: str | None, path: Path
) -> tuple[list[int], int | None]:
    if label_column is None:
        return list(range(len(names))), None
    if label_column not in names:
        raise ReferenceDataError(f"{path} has no column {label_column!r}; its columns are {names}")
    label_index = names.index(label_column)
    return [i for i in range(len(names)) if i != label_index], label_index


def _from_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise ReferenceDataError(f"{path} is empty")
    try:
        [float(v) for v in rows[0]]
        names = [str(i) for i in range(len(rows[0]))]
    except ValueError:
        names, rows = rows[0], rows[1:]
    feature_columns, label_index = _split_label_column(names, label_column, path)
    try:
        inputs = np.asarray([[float(r[i]) for i in feature_columns] for r in rows], np.float32)
    except (ValueError, IndexError) as exc:
        raise ReferenceDataError(f"{path}: every feature must be a number ({exc})") from None
    labels = None if label_index is None else np.asarray([r[label_index] for r in rows])
    return inputs, labels


def _from_parquet(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ReferenceDataError(
            "reading Parquet needs pyarrow: pip install 'edgeharvest[parquet]'"
        ) from None
    table = pq.read_table(path)
    names = list(table.column_names)
    feature_columns, label_index = _split_label_column(names, label_column, path)
    columns = [table.column(i).to_numpy() for i in feature_columns]
    inputs = np.stack(columns, axis=1).astype(np.float32)
    labels = None if label_index is None else table.column(label_index).to_numpy()
    return inputs, labels


def _read_labels(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        labels: np.ndarray = np.load(path, allow_pickle=False)
        return labels
    with path.open(newline="", encoding="utf-8") as f:
        return np.asarray([row[0] for row in csv.reader(f) if row])


def read_reference_data(
    path: Path, labels_path: Path | None = None, label_column: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise ReferenceDataError(f"reference data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        inputs, labels = np.load(path, allow_pickle=False), None
    elif suffix == ".npz":
        inputs, labels = _from_npz(path)
    elif suffix in (".csv", ".txt"):
        inputs, labels = _from_csv(path, label_column)
    elif suffix in (".parquet", ".pq"):
        inputs, labels = _from_parquet(path, label_column)
    else:
        raise ReferenceDataError(
            f"cannot read {path}: expected a .npy, .npz, .csv or .parquet file"
        )
    if labels_path is not None:
        labels = _read_labels(labels_path)
    return inputs, labels


def fit_to_model(
    inputs: np.ndarray,
    labels: np.ndarray | None,
    instance_shape: list[int],
    dtype: np.dtype[np.generic],
    class_names: list[str],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reshape the inputs to the model's instance shape and map labels to class indices."""
    fixed = all(d != -1 for d in instance_shape)
    if fixed:
        size = int(np.prod(instance_shape))
        if inputs.size % size or inputs.reshape(len(inputs), -1).shape[1] != size:
            raise ReferenceDataError(
                f"reference rows have shape {list(inputs.shape[1:])}; the model expects "
                f"instances of shape {instance_shape}"
            )
        inputs = inputs.reshape(len(inputs), *instance_shape)
    inputs = inputs.astype(dtype, copy=False)
    if labels is None:
        return inputs, None
    if len(labels) != len(inputs):
        raise ReferenceDataError(f"{len(labels)} labels for {len(inputs)} rows")
    if labels.dtype.kind in "iu":
        indices = labels.astype(np.int64)
    else:
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in labels} - set(lookup))
        if unknown and all(str(v).lstrip("-").isdigit() for v in labels):
            indices = labels.astype(np.int64)
        elif unknown:
            raise ReferenceDataError(
                f"labels {unknown[:5]} are not class names of the model; expected one of "
                f"{class_names} or class indices"
            )
        else:
            indices = np.asarray([lookup[str(v)] for v in labels], dtype=np.int64)
    bad = (indices < 0) | (indices >= len(class_names))
    if bad.any():
        raise ReferenceDataError(
            f"label {int(indices[bad][0])} is outside 0..{len(class_names) - 1}"
        )
    return inputs, indices
