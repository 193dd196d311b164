"""The batcher's pure decisions: which requests form a batch, where each one's rows are, and who
is admitted to the queue. Exact expectations, no clock."""

from __future__ import annotations

import pytest

from service.batch_plan import (
    Admission,
    RequestSpan,
    admit,
    batch_length,
    expected_wait,
    full_batch_seconds_estimate,
    request_spans,
)

SHAPE = (64,)


def queue(*sizes: int) -> list[tuple[int, tuple[int, ...]]]:
    return [(size, SHAPE) for size in sizes]


def test_an_empty_queue_forms_no_batch() -> None:
    assert batch_length([], 8) == 0


def test_the_longest_prefix_that_fits_forms_the_batch() -> None:
    assert batch_length(queue(1, 1, 1), 8) == 3
    assert batch_length(queue(3, 5, 1), 8) == 2
    assert batch_length(queue(8, 1), 8) == 1
    assert batch_length(queue(*[1] * 40), 32) == 32


def test_requests_are_never_reordered_to_fill_a_batch() -> None:
    # The 6 does not fit after the 3; the 1 behind it waits its turn rather than overtaking it.
    assert batch_length(queue(3, 6, 1), 8) == 1


def test_a_request_larger_than_the_maximum_runs_alone() -> None:
    assert batch_length(queue(20, 1), 8) == 1
    assert batch_length(queue(1, 20), 8) == 1


def test_only_requests_of_one_instance_shape_share_a_batch() -> None:
    assert batch_length([(1, (8, 8)), (1, (8, 8)), (1, (4, 4)), (1, (8, 8))], 8) == 2


def test_a_maximum_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        batch_length(queue(1), 0)


def test_request_spans_cover_the_rows_in_order() -> None:
    assert request_spans(["a", "b", "c"], [2, 1, 3]) == [
        RequestSpan("a", 0, 2),
        RequestSpan("b", 2, 3),
        RequestSpan("c", 3, 6),
    ]
    assert [s.size for s in request_spans(["a", "b"], [4, 5])] == [4, 5]


def test_request_spans_refuse_mismatched_or_empty_requests() -> None:
    with pytest.raises(ValueError, match="2 request ids but 1 sizes"):
        request_spans(["a", "b"], [1])
    with pytest.raises(ValueError, match="request 'b' has 0 instances"):
        request_spans(["a", "b"], [1, 0])


@pytest.mark.parametrize(
    ("queued", "busy", "batches"),
    [(0, False, 0), (0, True, 1), (7, False, 0), (8, False, 1), (8, True, 2), (17, True, 3)],
)
def test_expected_wait_counts_the_running_batch_and_every_full_batch_ahead(
    queued: int, busy: bool, batches: int
) -> None:
    assert expected_wait(queued, busy, 8, 0.25) == batches * 0.25


def test_admission_holds_exactly_up_to_the_bound() -> None:
    # Batches of 4 taking 1 s each, at most 2 s of queueing: with one batch running, the
    # queue may hold up to 7 instances (1 running + 1 full batch ahead = 2 s).
    for queued in range(8):
        assert admit(queued, True, 4, 1.0, 2.0).admitted
    refused = admit(8, True, 4, 1.0, 2.0)
    assert refused == Admission(admitted=False, expected_wait=3.0)
    assert refused.retry_after == 3


def test_an_idle_model_with_an_empty_queue_always_admits() -> None:
    assert admit(0, False, 4, 100.0, 0.0).admitted
    # ... but with a zero bound nothing may wait behind a running batch.
    assert not admit(0, True, 4, 0.001, 0.0).admitted


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert Admission(False, 0.01).retry_after == 1
    assert Admission(False, 2.0).retry_after == 2
    assert Admission(False, 2.01).retry_after == 3


def test_the_estimate_follows_full_batches_only() -> None:
    assert full_batch_seconds_estimate(1.0, 2.0, size=8, max_batch_size=8, weight=0.5) == 1.5
    # Half a batch is scaled to a full one.
    assert full_batch_seconds_estimate(1.0, 1.0, size=4, max_batch_size=8, weight=1.0) == 2.0
    # Small batches are mostly fixed cost: they leave the estimate alone.
    assert full_batch_seconds_estimate(1.0, 0.1, size=3, max_batch_size=8) == 1.0
    with pytest.raises(ValueError, match="weight must be within"):
        full_batch_seconds_estimate(1.0, 1.0, size=8, max_batch_size=8, weight=0.0)
