"""The adaptive batcher: concurrent requests to one model share one onnxruntime call.

A request joins the model's queue and waits for its share of a batch. One task per model runs
the batches: whenever the model is free it takes what is queued (`batch_plan.batch_length`),
concatenates it, runs the model once, and gives each request its rows back. It never waits for
a timer: a request that finds the model idle and the queue empty runs at once, alone (after two
turns of the event loop, microseconds, in which requests already received may join it), so
light traffic pays no latency for batching; under load, requests gather while a batch runs.

Slow batches run in a thread of their own, so the event loop keeps reading requests meanwhile
and the next batch starts as soon as the model is free, while the last one's results are being
shaped; quick ones run inline, where a thread hop would cost more than the model. Which is which
follows from the model's measured duration at one instance and at a full batch.

Admission is bounded by the wait a request can expect (`batch_plan.admit`): past the maximum
queueing delay it is refused with `QueueFull` (503 and `Retry-After`) rather than queued to
time out. `stop()` refuses new requests and finishes every queued and running batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from service.batch_plan import (
    Admission,
    RequestSpan,
    admits,
    batch_length,
    expected_wait,
    full_batch_seconds_estimate,
    request_spans,
)
from service.errors import ServiceUnavailable
from service.onnx_classifier import Prediction

logger = logging.getLogger("edgeharvest.batcher")

Result = TypeVar("Result")

# A batch expected to take this long runs in the batcher's thread: a thread hop costs tens of
# microseconds, and an event loop held for longer than this delays every other request.
OFFLOAD_MIN_SECONDS = 0.001
# Event-loop turns a batch that is not full waits for requests already received (`_gather`),
# while the recent batches held at least this many requests on average.
GATHER_TURNS = 2
GATHER_MIN_REQUESTS_PER_BATCH = 1.5
# Weight of the latest batch in that average.
_REQUESTS_PER_BATCH_WEIGHT = 0.1

# Runs the model on a batch (inline or in the batcher's thread).
Infer = Callable[[np.ndarray], Prediction]
# Turns a batch's prediction into one result per request (on the event loop's thread).
Finish = Callable[[np.ndarray, Prediction, Sequence[RequestSpan]], list[Result]]


class QueueFull(ServiceUnavailable):
    """503: the request would wait longer than the bound, or the batcher is stopping."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"retry-after": str(retry_after)}


@dataclass(frozen=True)
class BatchingPolicy:
    max_batch_size: int
    # The longest a request may expect to wait for its batch to start; 0 queues nothing.
    max_queue_delay_seconds: float

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if not self.max_queue_delay_seconds >= 0:
            raise ValueError(
                f"max_queue_delay_seconds must be non-negative, got {self.max_queue_delay_seconds}"
            )


class BatcherMetrics(Protocol):
    def batch_ran(self, seconds: float) -> None: ...
    def queue_waits(self, seconds: np.ndarray) -> None: ...
    def rejected(self) -> None: ...


@dataclass(slots=True)
class _Queued(Generic[Result]):
    batch: np.ndarray
    request_id: str
    future: asyncio.Future[Result]
    enqueued: float


@dataclass(slots=True)
class _Running(Generic[Result]):
    requests: list[_Queued[Result]]
    batch: np.ndarray
    # The thread's job when the batch runs there; None when it runs inline.
    job: asyncio.Future[tuple[Prediction, float]] | None


class AdaptiveBatcher(Generic[Result]):
    def __init__(
        self,
        name: str,
        policy: BatchingPolicy,
        infer: Infer,
        finish: Finish[Result],
        *,
        offload_min_values: int | None = None,
        offload_min_seconds: float = OFFLOAD_MIN_SECONDS,
        initial_batch_seconds: float | None = None,
        executor: Executor | None = None,
        metrics: BatcherMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """A batch runs in the batcher's thread when it holds at least `offload_min_values`
        input values, or when the warm-up measurements (see `start`) predict it takes at least
        `offload_min_seconds`; otherwise inline.

        `initial_batch_seconds` is a full batch's duration until batches are measured; unset,
        `start(warm_up=...)` measures it.
        """
        self.name = name
        self.policy = policy
        self._infer = infer
        self._finish = finish
        self._offload_min_values = offload_min_values
        self._offload_min_seconds = offload_min_seconds
        # Warm-up durations of one instance and of a full batch, for `_offloads`.
        self._one_seconds: float | None = None
        self._full_seconds: float | None = None
        # One thread: the model runs one batch at a time, that is the point.
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"batch-{name}")
        self._owns_executor = executor is None
        self._metrics = metrics
        self._clock = clock
        self.batch_seconds = initial_batch_seconds
        self._queue: deque[_Queued[Result]] = deque()
        self._queued_instances = 0
        self._running = False
        self._stopping = False
        # Dispatched and not yet answered: failed too if the batch task itself breaks.
        self._in_flight: list[_Queued[Result]] = []
        # Requests per batch, a moving average: is there concurrency to gather?
        self._requests_per_batch = 1.0
        # Set by `submit` and `stop` to wake the batch task from an empty queue.
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_instances(self) -> int:
        return self._queued_instances

    async def submit(self, batch: np.ndarray, request_id: str) -> Result:
        """This request's result once its batch has run (requests queued before `start()`
        wait for it). Raises `QueueFull` past the queueing bound or while stopping."""
        if self._stopping:
            raise QueueFull(f"model '{self.name}' is shutting down; retry on another replica", 1)
        wait = expected_wait(
            self._queued_instances,
            self._running,
            self.policy.max_batch_size,
            self.batch_seconds or 0.0,
        )
        if not admits(wait, self.policy.max_queue_delay_seconds):
            admission = Admission(False, wait)
            if self._metrics is not None:
                self._metrics.rejected()
            raise QueueFull(
                f"model '{self.name}' is saturated: this request would wait about "
                f"{admission.expected_wait:.3f} s for its batch, over the maximum queueing delay "
                f"of {self.policy.max_queue_delay_seconds} s "
                f"(EDGEHARVEST_BATCHING_MAX_QUEUE_DELAY_SECONDS); retry after "
                f"{admission.retry_after} s",
                admission.retry_after,
            )
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(batch, request_id, future, self._clock()))
        self._queued_instances += len(batch)
        self._wake()
        return await future

    async def start(self, warm_up: np.ndarray | None = None) -> None:
        """Start the batch task. `warm_up`, a full batch, is run first (a new input shape
        allocates on its first run) and, unless given, measures a full batch's duration."""
        if self._task is not None:
            raise RuntimeError(f"the batcher of model '{self.name}' was started twice")
        if warm_up is not None:
            loop = asyncio.get_running_loop()
            durations = {}
            for size in (1, len(warm_up)):
                for _ in range(2):
                    _, seconds = await loop.run_in_executor(
                        self._executor, self._timed, warm_up[:size]
                    )
                durations[size] = seconds
            self._one_seconds, self._full_seconds = durations[1], durations[len(warm_up)]
            if self.batch_seconds is None:
                self.batch_seconds = self._full_seconds * self.policy.max_batch_size / len(warm_up)
        self._task = asyncio.create_task(self._serve(), name=f"edgeharvest-batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new requests, finish every queued and running batch, then end the task."""
        self._stopping = True
        self._wake()
        if self._task is not None:
            await self._task
        elif self._queue:
            # Never started: run what was queued here, so no request waits forever.
            await self._run()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    # ---- the batch task ----------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            await self._run()
        except Exception:
            # A bug here must not leave requests waiting forever: fail them and refuse more.
            logger.exception("the batcher of model '%s' failed; refusing its requests", self.name)
            self._stopping = True
            error = QueueFull(f"model '{self.name}' cannot serve: its batcher failed", 1)
            for request in [*self._in_flight, *self._queue]:
                if not request.future.done():
                    request.future.set_exception(error)
            self._queue.clear()
            self._queued_instances = 0

    async def _run(self) -> None:
        running: _Running[Result] | None = None
        while True:
            if running is None:
                if not self._queue:
                    if self._stopping:
                        return
                    # A plain future, not an asyncio.Event: this runs once per batch.
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                    continue
                await self._gather()
                running = self._dispatch()
                if running is None:
                    continue
            try:
                prediction, seconds = await self._outcome(running)
            except Exception as exc:
                self._running = False
                await self._fail(running, exc)
                running = None
                continue
            current, running = running, None
            self._observe(current, seconds)
            # The model is free: a batch for the thread starts now, while this one's results
            # are shaped on the loop; an inline one starts after, it would hold them up.
            if self._queue and self._offloads(self._next_requests()):
                running = self._dispatch(offload=True)
            if running is None:
                self._running = False
            self._deliver(current, prediction)
            if running is None and self._queue:
                # Let the responses just delivered go out before the next inline batch.
                await asyncio.sleep(0)

    async def _gather(self) -> None:
        """Let requests the event loop has already received join a batch that is not full.

        Not a timer: two turns of the loop, microseconds. A request read from its socket in
        the loop's latest poll reaches the queue one turn later (its task is scheduled behind
        this one); without the turns the batch would leave it for the next one. Measured on
        the digits model with 16 clients: twice the instances per batch, a fifth more
        requests/s. Only while batches have recently gathered several requests: a lone client
        would pay the turns on every request and gain nothing.
        """
        if self._requests_per_batch < GATHER_MIN_REQUESTS_PER_BATCH:
            return
        for _ in range(GATHER_TURNS):
            if self._queued_instances >= self.policy.max_batch_size:
                return
            await asyncio.sleep(0)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _next_requests(self) -> list[_Queued[Result]]:
        shapes = ((len(r.batch), r.batch.shape[1:]) for r in self._queue)
        count = batch_length(shapes, self.policy.max_batch_size)
        return [self._queue[i] for i in range(count)]

    def _dispatch(self, offload: bool | None = None) -> _Running[Result] | None:
        """Start the next batch (in the thread if `offload`; None: decide); None if all its
        requests were cancelled meanwhile."""
        requests = self._next_requests()
        for _ in requests:
            self._queue.popleft()
        self._queued_instances -= sum(len(r.batch) for r in requests)
        # A request whose client went away (its task was cancelled) is not run for nobody.
        requests = [r for r in requests if not r.future.done()]
        if not requests:
            return None
        self._requests_per_batch += _REQUESTS_PER_BATCH_WEIGHT * (
            len(requests) - self._requests_per_batch
        )
        if self._metrics is not None:
            now = self._clock()
            self._metrics.queue_waits(np.array([now - r.enqueued for r in requests]))
        if len(requests) == 1:
            batch = requests[0].batch
        else:
            batch = np.concatenate([r.batch for r in requests], axis=0)
        self._running = True
        self._in_flight.extend(requests)
        if offload is None:
            offload = self._offloads(requests)
        return _Running(requests, batch, self._start_job(batch, offload))

    def _offloads(self, requests: Sequence[_Queued[Result]]) -> bool:
        """Whether these requests' batch should run in the thread."""
        values = sum(r.batch.size for r in requests)
        if self._offload_min_values is not None and values >= self._offload_min_values:
            return True
        if self._one_seconds is None or self._full_seconds is None:
            return False
        # Interpolated between the two warm-up sizes: a fixed cost plus one per instance.
        instances = sum(len(r.batch) for r in requests)
        slope = (self._full_seconds - self._one_seconds) / max(1, self.policy.max_batch_size - 1)
        expected = self._one_seconds + slope * (instances - 1)
        return expected >= self._offload_min_seconds

    def _start_job(
        self, batch: np.ndarray, offload: bool
    ) -> asyncio.Future[tuple[Prediction, float]] | None:
        if not offload:
            return None
        loop = asyncio.get_running_loop()
        return asyncio.ensure_future(loop.run_in_executor(self._executor, self._timed, batch))

    def _timed(self, batch: np.ndarray) -> tuple[Prediction, float]:
        started = self._clock()
        prediction = self._infer(batch)
        return prediction, self._clock() - started

    async def _outcome(self, running: _Running[Result]) -> tuple[Prediction, float]:
        if running.job is not None:
            return await running.job
        return self._timed(running.batch)

    def _observe(self, running: _Running[Result], seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.batch_ran(seconds)
        if self.batch_seconds is not None:
            self.batch_seconds = full_batch_seconds_estimate(
                self.batch_seconds, seconds, len(running.batch), self.policy.max_batch_size
            )

    def _deliver(self, running: _Running[Result], prediction: Prediction) -> None:
        requests = running.requests
        spans = request_spans([r.request_id for r in requests], [len(r.batch) for r in requests])
        try:
            results = self._finish(running.batch, prediction, spans)
        except Exception as exc:
            logger.exception("shaping the results of a batch of model '%s' failed", self.name)
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            self._forget(requests)
            return
        for request, result in zip(requests, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)
        self._forget(requests)

    def _forget(self, requests: Sequence[_Queued[Result]]) -> None:
        """These requests are answered: no longer in flight."""
        done = {id(r) for r in requests}
        self._in_flight = [r for r in self._in_flight if id(r) not in done]

    async def _fail(self, running: _Running[Result], error: Exception) -> None:
        """A batch raised: run its requests one by one, so only the culprit gets an error."""
        if len(running.requests) == 1:
            request = running.requests[0]
            if not request.future.done():
                request.future.set_exception(error)
            self._forget(running.requests)
            return
        logger.warning(
            "a batch of %d requests to model '%s' failed (%s); running them one by one",
            len(running.requests),
            self.name,
            error,
        )
        for request in running.requests:
            job = self._start_job(request.batch, self._offloads([request]))
            alone = _Running([request], request.batch, job)
            try:
                prediction, seconds = await self._outcome(alone)
            except Exception as exc:
                if not request.future.done():
                    request.future.set_exception(exc)
                self._forget([request])
                continue
            self._observe(alone, seconds)
            self._deliver(alone, prediction)
