"""The drift worker's pure parts: buffered events, window plans, summaries, streaming alarms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.drift_detectors import PageHinkley
from service.drift_report import render_html
from service.drift_windows import (
    StreamingAlarms,
    finite_json,
    pack_event,
    plan_count_window,
    plan_time_window,
    read_buffered,
    score_histograms,
    window_data,
)
from service.drift_worker import drift_config
from service.events import Event, event_fields


def buffered(entries: dict[str, tuple[str, float]]) -> dict:
    """event id -> (`stream entry id` or `stream entry id/row`, timestamp), as the worker reads
    them back from Redis."""
    result = {}
    for event_id, (position, ts) in entries.items():
        entry_id, _, row = position.partition("/")
        packed = pack_event(entry_id, int(row or 0), ts, {"id": event_id.encode()})
        result[event_id] = read_buffered(packed)
    return result


def test_packed_events_round_trip_every_field_byte_for_byte() -> None:
    fields = {"id": b"abc-0", "meta": b'{"ts": 1.5}', "input": bytes(range(256)), "empty": b""}
    event = read_buffered(pack_event("1700000000000-12", 7, 1.5, fields))
    assert event.entry_id == "1700000000000-12"
    assert event.row == 7
    assert event.timestamp == 1.5
    assert event.order == (1700000000000, 12, 7)
    assert event.fields() == fields


def test_events_buffered_before_batch_entries_are_read_as_row_zero() -> None:
    old = b"1700000000000-12 1.5\n" + pack_event("x", 0, 0.0, {"id": b"e"}).partition(b"\n")[2]
    event = read_buffered(old)
    assert (event.entry_id, event.row, event.timestamp) == ("1700000000000-12", 0, 1.5)
    assert event.fields() == {"id": b"e"}


def test_a_buffered_event_decodes_to_the_event_it_was_made_of() -> None:
    event = Event(
        id="abc-3",
        meta={"id": "abc-3", "ts": 2.5, "input_dtype": "float32", "input_shape": [2]},
        input=np.array([1.5, -2.0], np.float32),
        embedding=np.array([0.6, 0.8], np.float16).astype(np.float32),
        probabilities=np.array([0.25, 0.75], np.float32),
    )
    decoded = read_buffered(pack_event("5-0", 3, 2.5, event_fields(event))).event()
    assert decoded.id == event.id and decoded.meta == event.meta
    assert decoded.input is not None
    np.testing.assert_array_equal(decoded.input, event.input)
    np.testing.assert_array_equal(decoded.embedding, event.embedding)
    np.testing.assert_array_equal(decoded.probabilities, event.probabilities)


def test_count_window_takes_the_oldest_events_in_stream_order_not_text_order() -> None:
    events = buffered(
        {"a": ("10-0", 5.0), "b": ("9-1", 4.0), "c": ("9-0", 3.0), "d": ("11-0", 6.0)}
    )
    assert plan_count_window(events, 5, 0) is None
    plan = plan_count_window(events, 3, 7)
    assert plan is not None
    assert plan.index == 7
    assert plan.event_ids == ["c", "b", "a"]  # "10-0" sorts before "9-0" as text
    assert (plan.start_time, plan.end_time) == (3.0, 5.0)
    assert plan.late_ids == []


def test_count_window_cuts_an_entry_between_its_rows_in_row_order() -> None:
    # Two entries of three events (one inference batch each), in a buffer keyed by event id.
    events = buffered(
        {
            "y-2": ("10-0/2", 2.0),
            "x-10": ("9-0/10", 1.0),
            "y-0": ("10-0/0", 2.0),
            "x-2": ("9-0/2", 1.0),
            "x-9": ("9-0/9", 1.0),
            "y-1": ("10-0/1", 2.0),
        }
    )
    plan = plan_count_window(events, 4, 0)
    assert plan is not None
    assert plan.event_ids == ["x-2", "x-9", "x-10", "y-0"]  # row 10 after row 9, not as text
    rest = {k: v for k, v in events.items() if k not in plan.event_ids}
    following = plan_count_window(rest, 2, 1)
    assert following is not None and following.event_ids == ["y-1", "y-2"]


def test_time_window_closes_after_its_end_plus_grace_and_sets_late_events_aside() -> None:
    events = buffered(
        {
            "late": ("1-0", 59.0),  # period 0, already closed (next index is 1)
            "a": ("2-0", 61.0),  # period 1: [60, 120)
            "b": ("3-0", 119.0),
            "c": ("4-0", 121.0),  # period 2
        }
    )
    # Period 1 ends at 120; with 10 s of grace it closes at 130, not before.
    early = plan_time_window(events, 60.0, 1, now=129.9, grace=10.0)
    assert early is not None
    assert early.event_ids == [] and early.late_ids == ["late"]
    plan = plan_time_window(events, 60.0, 1, now=130.0, grace=10.0)
    assert plan is not None
    assert (plan.index, plan.start_time, plan.end_time) == (1, 60.0, 120.0)
    assert plan.event_ids == ["a", "b"]
    assert plan.late_ids == ["late"]
    assert plan_time_window(buffered({"c": ("4-0", 121.0)}), 60.0, 2, 130.0, 10.0) is None


def make_event(i: int, *, scores: dict[str, float], stored_input: bool) -> Event:
    return Event(
        id=f"e{i}",
        meta={"predicted": i % 3, "scores": scores, "percentiles": {}},
        input=np.full((2, 2), i, dtype=np.float32) if stored_input else None,
        embedding=np.array([1.0, 0.0], dtype=np.float32),
        probabilities=np.array([0.5, 0.3, 0.2], dtype=np.float32),
    )


def test_window_data_stacks_events_and_keeps_only_stored_inputs() -> None:
    events = [
        make_event(0, scores={"novelty": 0.1}, stored_input=True),
        make_event(1, scores={"novelty": 0.3, "margin": 0.2}, stored_input=False),
        make_event(2, scores={"novelty": 0.5}, stored_input=True),
    ]
    data = window_data(events, ["novelty", "margin"])
    assert data.predicted.tolist() == [0, 1, 2]
    assert data.scores["novelty"].tolist() == [0.1, 0.3, 0.5]
    assert math.isnan(data.scores["margin"][0]) and data.scores["margin"][1] == 0.2
    assert data.probabilities is not None and data.probabilities.shape == (3, 3)
    assert data.inputs is not None and data.inputs.tolist() == [[0, 0, 0, 0], [2, 2, 2, 2]]
    with pytest.raises(ValueError, match="at least one event"):
        window_data([], ["novelty"])


def test_score_histograms_share_edges_and_sum_to_one() -> None:
    reference = {"novelty": np.array([0.0, 0.0, 1.0, 1.0]), "only_ref": np.array([1.0])}
    window = {"novelty": np.array([0.0, 2.0, np.nan]), "only_window": np.array([1.0])}
    result = score_histograms(reference, window, bins=2)
    assert list(result) == ["novelty"]
    assert result["novelty"]["edges"] == [0.0, 1.0, 2.0]
    assert result["novelty"]["reference"] == [0.5, 0.5]
    assert result["novelty"]["window"] == [0.5, 0.5]  # the NaN is left out
    constant = score_histograms({"s": np.array([3.0])}, {"s": np.array([3.0])}, bins=2)
    assert constant["s"]["edges"] == [3.0, 3.5, 4.0]


def test_finite_json_replaces_non_finite_floats_everywhere() -> None:
    value = {"a": [1.0, math.nan, {"b": math.inf}], "c": np.float64(-math.inf), "d": "x", "e": 2}
    assert finite_json(value) == {"a": [1.0, None, {"b": None}], "c": None, "d": "x", "e": 2}


def test_page_hinkley_resumed_from_its_state_goes_on_identically() -> None:
    rng = np.random.default_rng(3)
    stream = np.r_[rng.uniform(0, 1, 600), rng.uniform(0.3, 1, 600)]
    whole = PageHinkley()
    alarms_whole = [whole.update(x).drift_detected for x in stream]
    first = PageHinkley()
    alarms_split = [first.update(x).drift_detected for x in stream[:500]]
    resumed = PageHinkley().restore(first.state())
    alarms_split += [resumed.update(x).drift_detected for x in stream[500:]]
    assert alarms_split == alarms_whole
    assert any(alarms_whole)
    with pytest.raises(ValueError, match="not a PageHinkley state"):
        PageHinkley().restore({"n": 1})


def test_streaming_alarm_fires_on_rising_novelty_and_stays_visible_for_its_span() -> None:
    rng = np.random.default_rng(0)
    calm = [
        {"novelty": float(p), "max_probability": float(q)} for p, q in rng.uniform(0, 100, (800, 2))
    ]
    alarms = StreamingAlarms({}, span=100)
    for row in calm:
        alarms.update(row)
    assert not alarms.alarm("novelty") and not alarms.alarm("max_probability")
    # Resume from the stored state, as another worker would, then novelty jumps to the top.
    alarms = StreamingAlarms(alarms.state(), span=100)
    fired_at = None
    for i in range(400):
        alarms.update({"novelty": 99.0, "max_probability": float(rng.uniform(0, 100))})
        if fired_at is None and alarms.alarm("novelty"):
            fired_at = i
    assert fired_at is not None and fired_at < 200
    state = alarms.state()
    assert state["novelty"]["detections"] >= 1
    assert not state["max_probability"]["alarm"]
    # Missing or non-finite percentiles (a model without a reference) are skipped.
    alarms.update({"novelty": math.nan})
    assert StreamingAlarms({}, span=10).state()["novelty"]["since_detection"] is None


def test_drift_config_from_settings_names_unknown_keys_and_bad_values() -> None:
    config = drift_config(
        500, None, {"alpha": 0.001, "mmd_permutations": 1000, "tests": ["scores", "mmd"]}
    )
    assert (config.window_size, config.window_seconds, config.alpha) == (500, None, 0.001)
    assert config.tests == frozenset({"scores", "mmd"})
    timed = drift_config(500, 60.0, {})
    assert (timed.window_size, timed.window_seconds) == (None, 60.0)
    with pytest.raises(ValueError, match=r"unknown keys \['nope'\]"):
        drift_config(500, None, {"nope": 1})
    with pytest.raises(ValueError, match="EDGEHARVEST_DRIFT: alpha must be within"):
        drift_config(500, None, {"alpha": 2})


def test_report_html_shows_tests_histograms_and_escapes_names() -> None:
    latest = {
        "index": 3,
        "size": 1000,
        "alarm": True,
        "alarms": {"scores:novelty": True},
        "results": [
            {
                "test": "scores:novelty",
                "statistic": 0.5,
                "p_value": 1e-12,
                "effect_size": 0.9,
                "effect_name": "psi",
                "drifting": True,
            }
        ],
        "histograms": {"novelty": {"edges": [0, 1, 2], "reference": [1, 0], "window": [0, 1]}},
    }
    summary = {
        "model": "<digits>",
        "version": "1",
        "windows_evaluated": 4,
        "streaming": {"novelty": {"alarm": True, "detections": 2}},
        "latest": latest,
        "history": [latest],
    }
    page = render_html(summary, generated_at=0)
    assert "&lt;digits&gt;" in page and "<digits>" not in page
    assert "scores:novelty" in page and "1.00e-12" in page and "ALARM" in page
    assert page.count("<svg") == 1
    assert "1970-01-01 00:00:00 UTC" in page
    empty = render_html({"model": "m", "version": "1", "latest": None, "history": []})
    assert "No window has been evaluated yet" in empty
