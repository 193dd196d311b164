"""How queued requests become one onnxruntime call, and how its results go back: no IO, no clock.

The adaptive batcher (`batcher.py`) keeps a first-in first-out queue per model. Whenever the
model is free it takes the longest run of requests from the front of the queue that fits
`max_batch_size` instances and shares one instance shape, and never waits for more to arrive:
under light load a batch is a single request, under load batches fill up while the previous one
runs. A request larger than `max_batch_size` runs alone, never split.

A request is admitted only while the wait it can expect stays within the maximum queueing
delay: a full batch's duration for the batch in flight, plus one for every full batch of
instances queued ahead of it. Past that bound it gets a 503 with `Retry-After`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class RequestSpan(NamedTuple):
    """Rows [start, stop) of a gathered batch came from the request `request_id`.

    A named tuple: one is made per request, and a frozen dataclass costs five times as much.
    """

    request_id: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def batch_length(queue: Iterable[tuple[int, tuple[int, ...]]], max_batch_size: int) -> int:
    """How many requests from the front of `queue` form the next batch.

    `queue` holds (instances, instance shape) per request, oldest first, and is read only as
    far as the batch reaches (a long queue may be a lazy iterable). Requests are never
    reordered: a later small request does not overtake an earlier one that does not fit.

    >>> batch_length([(3, (64,)), (4, (64,)), (2, (64,))], max_batch_size=8)
    2
    >>> batch_length([(20, (64,)), (1, (64,))], max_batch_size=8)
    1
    >>> batch_length([(1, (8, 8)), (1, (4, 4))], max_batch_size=8)
    1
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    requests = iter(queue)
    first = next(requests, None)
    if first is None:
        return 0
    total, shape = first
    count = 1
    for size, next_shape in requests:
        if next_shape != shape or total + size > max_batch_size:
            break
        total += size
        count += 1
    return count


def request_spans(request_ids: Sequence[str], sizes: Sequence[int]) -> list[RequestSpan]:
    """The rows each request occupies once their inputs are concatenated in order.

    >>> request_spans(["a", "b"], [2, 3])
    [RequestSpan(request_id='a', start=0, stop=2), RequestSpan(request_id='b', start=2, stop=5)]
    """
    if len(request_ids) != len(sizes):
        raise ValueError(f"{len(request_ids)} request ids but {len(sizes)} sizes")
    spans = []
    start = 0
    for request_id, size in zip(request_ids, sizes, strict=True):
        if size < 1:
            raise ValueError(f"request {request_id!r} has {size} instances; expected at least 1")
        spans.append(RequestSpan(request_id, start, start + size))
        start += size
    return spans


def expected_wait(
    queued_instances: int, model_busy: bool, max_batch_size: int, batch_seconds: float
) -> float:
    """Seconds a request arriving now can expect to wait before its batch starts.

    The batch in flight counts whole (its remaining time is not known), and so does every full
    batch of instances queued ahead. Queued requests that do not fill a batch share one with the
    newcomer, so they add nothing.

    >>> expected_wait(0, False, 8, 0.01)
    0.0
    >>> expected_wait(7, True, 8, 0.01)
    0.01
    >>> expected_wait(16, True, 8, 0.01)
    0.03
    """
    batches = (1 if model_busy else 0) + queued_instances // max_batch_size
    return batches * batch_seconds


@dataclass(frozen=True)
class Admission:
    admitted: bool
    expected_wait: float

    @property
    def retry_after(self) -> int:
        """Whole seconds for `Retry-After`: when the queue ahead should have drained, at least 1."""
        return max(1, math.ceil(self.expected_wait))


def admit(
    queued_instances: int,
    model_busy: bool,
    max_batch_size: int,
    batch_seconds: float,
    max_queue_delay: float,
) -> Admission:
    """Whether a request may join the queue: only if its expected wait stays within the bound.

    A request that finds the model idle and nothing queued is always admitted, whatever the
    bound: refusing it could not shorten anyone's wait.

    >>> admit(8, True, 8, 0.1, max_queue_delay=0.2)
    Admission(admitted=True, expected_wait=0.2)
    >>> admit(16, True, 8, 0.1, max_queue_delay=0.2).admitted
    False
    >>> admit(0, False, 8, 5.0, max_queue_delay=0.0).admitted
    True
    """
    wait = expected_wait(queued_instances, model_busy, max_batch_size, batch_seconds)
    return Admission(admits(wait, max_queue_delay), wait)


def admits(expected_wait: float, max_queue_delay: float) -> bool:
    """The bound itself (`admit` explains a refusal). A relative tolerance: a wait summed from
    measured durations must not be refused for a rounding error above a bound it equals."""
    return expected_wait <= max_queue_delay * (1 + 1e-9)


def full_batch_seconds_estimate(
    current: float, duration: float, size: int, max_batch_size: int, weight: float = 0.2
) -> float:
    """The running estimate of one full batch's duration, updated with a measured batch.

    Only batches of at least half the maximum size update it (scaled to full size): the wait a
    queue causes is made of full batches, and a batch of one, mostly fixed cost, would
    understate them. Smaller batches leave the estimate as it is.

    >>> full_batch_seconds_estimate(0.010, 0.020, size=8, max_batch_size=8, weight=0.5)
    0.015
    >>> full_batch_seconds_estimate(0.010, 0.001, size=1, max_batch_size=8)
    0.01
    """
    if not 0 < weight <= 1:
        raise ValueError(f"weight must be within (0, 1], got {weight}")
    if 2 * size < max_batch_size or duration < 0:
        return current
    scaled = duration * max_batch_size / size
    return current + weight * (scaled - current)
