"""Queue items as people and tools read them: JSON for labelers, PNG for image inputs, JSONL
and Label Studio tasks for export, and Label Studio annotations back as labels.

No Redis here: functions take queue items and the model's manifest.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import orjson
from PIL import Image

from service.errors import InvalidInput
from service.label_queue import QueueItem, StoredItem
from service.manifest import Manifest

TOP_CLASSES = 3
# Label Studio's names for the image and the choice control in our labeling config.
LS_IMAGE, LS_TABLE, LS_CHOICES = "image", "features", "label"


def input_array(item: QueueItem) -> np.ndarray | None:
    if item.input is None:
        return None
    dtype = np.dtype(item.input_dtype).newbyteorder("<")
    return np.frombuffer(item.input, dtype=dtype).reshape(item.input_shape)


def image_of(item: QueueItem, manifest: Manifest) -> np.ndarray | None:
    """The input as a 2-D (or H x W x C) uint8 image, for image-shaped models; else None."""
    layout = manifest.input_layout
    values = input_array(item)
    if layout.kind != "image" or values is None or not layout.image_shape:
        return None
    low, high = layout.value_range or (float(values.min()), float(values.max()))
    scaled = (values.astype(np.float64) - low) / max(high - low, 1e-12)
    pixels = np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)
    return pixels.reshape(layout.image_shape)


def png_of(item: QueueItem, manifest: Manifest, scale: int = 16) -> bytes:
    """A PNG of an image input, enlarged with nearest-neighbour so small images stay crisp."""
    pixels = image_of(item, manifest)
    if pixels is None:
        raise InvalidInput(
            f"item '{item.item_id}' has no image-shaped input to render; model "
            f"'{manifest.name}' declares input_layout kind '{manifest.input_layout.kind}'"
        )
    image = Image.fromarray(pixels)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _top_classes(item: QueueItem, class_names: list[str]) -> list[dict[str, Any]]:
    probabilities = np.asarray(item.probabilities)
    order = np.argsort(-probabilities, kind="stable")[:TOP_CLASSES]
    return [
        {
            "class_index": int(i),
            "class_name": class_names[i],
            "probability": float(probabilities[i]),
        }
        for i in order
        if i < len(class_names)
    ]


def render_input(item: QueueItem, manifest: Manifest) -> dict[str, Any]:
    values = input_array(item)
    layout = manifest.input_layout
    rendered: dict[str, Any] = {
        "dtype": item.input_dtype,
        "shape": list(item.input_shape),
        "layout": layout.model_dump(mode="json", exclude_none=True),
        "values": None if values is None else values.tolist(),
    }
    if values is not None and layout.kind == "tabular" and layout.feature_names:
        rendered["features"] = [
            {"name": name, "value": float(value)}
            for name, value in zip(layout.feature_names, values.ravel().tolist(), strict=False)
        ]
    return rendered


def render_item(item: QueueItem, manifest: Manifest) -> dict[str, Any]:
    """What a labeler needs to decide: the input, the model's guess, and why it was flagged."""
    return {
        "item_id": item.item_id,
        "model": manifest.name,
        "version": item.model_version,
        "lane": item.lane,
        "rule": item.rule,
        "priority": item.priority,
        "predicted": {"class_index": item.predicted, "class_name": item.predicted_class},
        "top_classes": _top_classes(item, manifest.class_names),
        "class_names": manifest.class_names,
        "reasons": item.evidence,
        "nearest_labeled_distance": item.nearest_labeled_distance,
        "created_at": item.created_at,
        "input": render_input(item, manifest),
    }


def export_record(stored: StoredItem, manifest: Manifest) -> dict[str, Any]:
    """One labeled item for a retraining pipeline."""
    item, label = stored.item, stored.label
    assert label is not None
    return {
        "item_id": item.item_id,
        "model": manifest.name,
        "version": item.model_version,
        "label": label.label,
        "label_index": manifest.class_names.index(label.label)
        if label.label in manifest.class_names
        else None,
        "labeler": label.labeler,
        "labeled_at": label.labeled_at,
        "predicted": item.predicted,
        "predicted_class": item.predicted_class,
        "probabilities": list(item.probabilities),
        "lane": item.lane,
        "rule": item.rule,
        "reasons": item.evidence,
        "created_at": item.created_at,
        "input": render_input(item, manifest),
    }


def jsonl(records: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    for record in records:
        yield orjson.dumps(record) + b"\n"


def label_studio_config(manifest: Manifest) -> str:
    """A Label Studio labeling config matching `label_studio_task`."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in manifest.class_names)
    if manifest.input_layout.kind == "image":
        view = f'<Image name="{LS_IMAGE}" value="${LS_IMAGE}"/>'
        target = LS_IMAGE
    else:
        view = f'<Table name="{LS_TABLE}" value="${LS_TABLE}"/>'
        target = LS_TABLE
    return (
        f'<View>{view}<Choices name="{LS_CHOICES}" toName="{target}" choice="single" '
        f'showInline="true">{choices}</Choices></View>'
    )


def label_studio_task(stored: StoredItem, manifest: Manifest) -> dict[str, Any]:
    """A Label Studio task with the model's prediction as a pre-annotation."""
    item = stored.item
    data: dict[str, Any] = {
        "item_id": item.item_id,
        "model": manifest.name,
        "version": item.model_version,
        "lane": item.lane,
        "rule": item.rule,
    }
    target = LS_TABLE
    if image_of(item, manifest) is not None:
        encoded = base64.b64encode(png_of(item, manifest)).decode()
        data[LS_IMAGE] = f"data:image/png;base64,{encoded}"
        target = LS_IMAGE
    else:
        values = input_array(item)
        names = manifest.input_layout.feature_names or []
        flat = [] if values is None else values.ravel().tolist()
        data[LS_TABLE] = {(names[i] if i < len(names) else f"f{i}"): v for i, v in enumerate(flat)}
    probability = max(item.probabilities) if item.probabilities else None
    return {
        "data": data,
        "predictions": [
            {
                "model_version": f"{manifest.name}-{item.model_version}",
                "score": probability,
                "result": [
                    {
                        "from_name": LS_CHOICES,
                        "to_name": target,
                        "type": "choices",
                        "value": {"choices": [item.predicted_class]},
                    }
                ],
            }
        ],
    }


def label_studio_annotations(tasks: object) -> Iterator[tuple[str, str, str, str]]:
    """(item id, label, labeler, idempotency key) of each annotated task of a Label Studio
    JSON export; tasks without annotations, or cancelled ones, are passed over."""
    if not isinstance(tasks, list):
        raise InvalidInput("expected a Label Studio JSON export: a list of tasks")
    for position, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            raise InvalidInput(f"task {position} has no 'data' object")
        item_id = task["data"].get("item_id")
        if not isinstance(item_id, str):
            raise InvalidInput(
                f"task {position} has no data.item_id; import only tasks exported by edgeharvest"
            )
        for annotation in task.get("annotations") or []:
            if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
                continue
            for result in annotation.get("result") or []:
                choices = (
                    (result.get("value") or {}).get("choices") if isinstance(result, dict) else None
                )
                if result.get("type") == "choices" and choices:
                    labeler = str(annotation.get("completed_by", "label-studio"))
                    key = f"label-studio:{task.get('id', position)}:{annotation.get('id', 0)}"
                    yield item_id, str(choices[0]), f"label-studio:{labeler}", key
                    break
