"""The adaptive batcher on its own, with the real digits model: admission exactly up to the
queueing bound, gathering, draining at shutdown, and a failing request that fails alone."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from service.batch_plan import RequestSpan
from service.batcher import AdaptiveBatcher, BatchingPolicy, QueueFull
from service.dataplane import batching_policy
from service.errors import ManifestError
from service.manifest import MANIFEST_FILE, Manifest, OutputRoles, TensorSpec, file_sha256
from service.onnx_classifier import OnnxClassifier, Prediction, SessionConfig
from service.settings import Settings
from tests.support import MODELS_DIR

pytestmark = pytest.mark.anyio

X = load_digits().data.astype(np.float32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def digits() -> OnnxClassifier:
    folder = MODELS_DIR / "digits"
    return OnnxClassifier(Manifest.load(folder / MANIFEST_FILE), folder, SessionConfig())


class Recorder:
    """Keeps what the batcher reports, and each batch's size."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.waits: list[float] = []
        self.refused = 0

    def batch_ran(self, seconds: float) -> None:
        pass

    def queue_waits(self, seconds: np.ndarray) -> None:
        self.batches.append(len(seconds))
        self.waits.extend(seconds.tolist())

    def rejected(self) -> None:
        self.refused += 1


def split(
    batch: np.ndarray, prediction: Prediction, spans: Sequence[RequestSpan]
) -> list[Prediction]:
    return [prediction.slice(s.start, s.stop) for s in spans]


def batcher(
    model: OnnxClassifier,
    policy: BatchingPolicy,
    recorder: Recorder,
    *,
    offload: bool = False,
    batch_seconds: float = 1.0,
) -> AdaptiveBatcher[Prediction]:
    return AdaptiveBatcher(
        "digits:1",
        policy,
        model.predict,
        split,
        offload_min_values=0 if offload else None,
        initial_batch_seconds=batch_seconds,
        metrics=recorder,
    )


async def queue_up(
    queue: AdaptiveBatcher[Prediction], rows: Sequence[np.ndarray]
) -> list[asyncio.Future[Prediction]]:
    """Submit one request per row, each queued before the next is submitted."""
    futures = []
    for i, row in enumerate(rows):
        futures.append(asyncio.ensure_future(queue.submit(row, f"r{i}")))
        await asyncio.sleep(0)
    return futures


async def test_admission_stops_exactly_at_the_queueing_bound(digits: OnnxClassifier) -> None:
    # Batches of 4 that take 1 s (as far as the bound is concerned), at most 2.5 s of waiting:
    # a request may find at most two full batches ahead of it, so 11 instances queued admit a
    # twelfth (wait 2 s) and 12 refuse a thirteenth (wait 3 s).
    recorder = Recorder()
    queue = batcher(digits, BatchingPolicy(4, 2.5), recorder)
    futures = await queue_up(queue, [X[i : i + 1] for i in range(12)])
    assert queue.queued_instances == 12
    with pytest.raises(QueueFull) as refused:
        await queue.submit(X[12:13], "r12")
    assert refused.value.status_code == 503
    assert refused.value.headers == {"retry-after": "3"}
    assert "would wait about 3.000 s" in refused.value.message
    assert recorder.refused == 1
    # A request of several instances counts by its instances.
    await queue.start()
    await queue.stop()
    results = [f.result() for f in futures]
    assert recorder.batches == [4, 4, 4]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(
            result.probabilities, digits.predict(X[i : i + 1]).probabilities
        )


async def test_a_request_arriving_at_an_idle_model_runs_at_once_alone(
    digits: OnnxClassifier,
) -> None:
    recorder = Recorder()
    queue = batcher(digits, BatchingPolicy(32, 0.0), recorder, batch_seconds=10.0)
    await queue.start()
    result = await queue.submit(X[:3], "only")
    await queue.stop()
    assert recorder.batches == [1]
    np.testing.assert_array_equal(result.probabilities, digits.predict(X[:3]).probabilities)


async def test_requests_queued_while_a_batch_runs_form_the_next_batch(
    digits: OnnxClassifier,
) -> None:
    recorder = Recorder()
    # The model's thread is held busy until the test lets go, so "while a batch runs" does not
    # depend on how fast it runs.
    thread = ThreadPoolExecutor(1)
    gate = threading.Event()
    thread.submit(gate.wait)
    queue = AdaptiveBatcher(
        "digits:1",
        BatchingPolicy(8, 60.0),
        digits.predict,
        split,
        offload_min_values=0,
        initial_batch_seconds=1.0,
        executor=thread,
        metrics=recorder,
    )
    await queue.start()
    first = asyncio.ensure_future(queue.submit(X[:1], "first"))
    while not recorder.batches:
        await asyncio.sleep(0)
    # The first request went to the model alone; the ten that arrive meanwhile wait, then
    # share the next two batches.
    rest = await queue_up(queue, [X[i : i + 1] for i in range(1, 11)])
    assert queue.queued_instances == 10
    gate.set()
    results = [await first, *[await f for f in rest]]
    await queue.stop()
    thread.shutdown()
    assert recorder.batches == [1, 8, 2]
    for i, result in enumerate(results):
        alone = digits.predict(X[i : i + 1])
        np.testing.assert_array_equal(result.probabilities, alone.probabilities)
        np.testing.assert_array_equal(result.embedding, alone.embedding)


async def test_stop_drains_queued_and_running_batches(digits: OnnxClassifier) -> None:
    recorder = Recorder()
    queue = batcher(digits, BatchingPolicy(4, 60.0), recorder, offload=True)
    futures = await queue_up(queue, [X[i : i + 2] for i in range(0, 20, 2)])
    await queue.start()
    await asyncio.sleep(0)  # the first batch is now in the model's thread
    await queue.stop()
    assert all(f.done() for f in futures)
    for i, future in enumerate(futures):
        expected = digits.predict(X[2 * i : 2 * i + 2])
        np.testing.assert_array_equal(future.result().probabilities, expected.probabilities)
    assert sum(recorder.batches) == 10
    with pytest.raises(QueueFull, match="shutting down"):
        await queue.submit(X[:1], "late")


async def test_a_cancelled_request_is_not_run(digits: OnnxClassifier) -> None:
    recorder = Recorder()
    queue = batcher(digits, BatchingPolicy(4, 60.0), recorder)
    futures = await queue_up(queue, [X[i : i + 1] for i in range(3)])
    futures[1].cancel()
    await asyncio.sleep(0)
    await queue.start()
    await queue.stop()
    assert recorder.batches == [2]
    assert futures[0].result().probabilities.shape == (1, 10)


async def test_a_failing_request_fails_alone(digits: OnnxClassifier) -> None:
    # A request onnxruntime rejects (wrong width): its batch is rerun one request at a time.
    recorder = Recorder()
    queue = batcher(digits, BatchingPolicy(8, 60.0), recorder)
    good = await queue_up(queue, [X[:1], X[1:2]])
    bad = asyncio.ensure_future(queue.submit(np.zeros((1, 64), np.float64), "bad"))
    await asyncio.sleep(0)
    await queue.start()
    await queue.stop()
    assert good[0].result().probabilities.shape == (1, 10)
    assert good[1].result().probabilities.shape == (1, 10)
    with pytest.raises(Exception, match="Unexpected input data type"):
        bad.result()


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        BatchingPolicy(0, 1.0)
    with pytest.raises(ValueError, match="max_queue_delay_seconds must be non-negative"):
        BatchingPolicy(4, -1.0)


# ---- which models are batched, from settings and manifests ---------------------------------


def copy_digits(tmp_path: Path, batching: dict[str, object] | None) -> OnnxClassifier:
    folder = tmp_path / "digits"
    shutil.copytree(MODELS_DIR / "digits", folder)
    document = json.loads((folder / MANIFEST_FILE).read_text())
    if batching is not None:
        document["batching"] = batching
    (folder / MANIFEST_FILE).write_text(json.dumps(document))
    return OnnxClassifier(Manifest.load(folder / MANIFEST_FILE), folder, SessionConfig())


def test_settings_decide_for_models_whose_manifest_is_silent(tmp_path: Path) -> None:
    model = copy_digits(tmp_path, None)
    assert batching_policy(model, Settings()) == BatchingPolicy(32, 0.5)
    assert batching_policy(model, Settings(batching="off")) is None
    tuned = Settings(batching_max_batch_size=8, batching_max_queue_delay_seconds=0.1)
    assert batching_policy(model, tuned) == BatchingPolicy(8, 0.1)


def test_a_manifest_overrides_the_settings_defaults(tmp_path: Path) -> None:
    model = copy_digits(tmp_path, {"max_batch_size": 64, "max_queue_delay_seconds": 0.05})
    assert batching_policy(model, Settings()) == BatchingPolicy(64, 0.05)
    off = copy_digits(tmp_path / "off", {"enabled": False})
    assert batching_policy(off, Settings()) is None
    # ... but EDGEHARVEST_BATCHING=on|off decides for every model.
    assert batching_policy(off, Settings(batching="on")) == BatchingPolicy(32, 0.5)


def fixed_batch_model(tmp_path: Path, batching: dict[str, object] | None) -> OnnxClassifier:
    """A 4 -> 2 softmax classifier whose input batch dimension is fixed at 1."""
    weights = numpy_helper.from_array(np.eye(4, 2, dtype=np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 2])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    folder = tmp_path / "fixed"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    manifest = Manifest.model_validate(
        {
            "name": "fixed",
            "sha256": file_sha256(folder / "model.onnx"),
            "input": TensorSpec(name="input", datatype="FP32", shape=[1, 4]),
            "outputs": OutputRoles(probabilities="probabilities"),
            "class_names": ["a", "b"],
            "batching": batching,
        }
    )
    manifest.save(folder / MANIFEST_FILE)
    return OnnxClassifier(Manifest.load(folder / MANIFEST_FILE), folder, SessionConfig())


def test_a_model_that_cannot_be_batched_is_served_alone_or_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = fixed_batch_model(tmp_path / "silent", None)
    assert batching_policy(silent, Settings()) is None
    assert "served without batching: input 'input' has a fixed batch dimension of 1" in caplog.text
    asking = fixed_batch_model(tmp_path / "asking", {"enabled": True})
    with pytest.raises(ManifestError, match="its manifest enables batching, but input 'input'"):
        batching_policy(asking, Settings())


def test_outputs_without_the_batch_first_make_a_model_unbatchable(tmp_path: Path) -> None:
    # A graph that also returns a constant (no batch dimension) as an output.
    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["input"], ["probabilities"], axis=1),
            helper.make_node("ReduceMean", ["input"], ["summary"], axes=[0, 1], keepdims=0),
        ],
        "summary",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("summary", TensorProto.FLOAT, []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (tmp_path / "model.onnx").write_bytes(model.SerializeToString())
    manifest = Manifest(
        name="summary",
        sha256=file_sha256(tmp_path / "model.onnx"),
        input=TensorSpec(name="input", datatype="FP32", shape=[-1, 3]),
        outputs=OutputRoles(probabilities="probabilities"),
        class_names=["a", "b", "c"],
    )
    classifier = OnnxClassifier(manifest, tmp_path, SessionConfig())
    assert classifier.unbatchable_reason() == (
        "output 'summary' has shape [] for a batch of 1; every output must have the batch as "
        "its first dimension"
    )
