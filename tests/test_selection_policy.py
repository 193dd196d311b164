"""The selection policy on hand-built rounds: 2-D unit embeddings whose picks follow by hand.

Angles are in degrees on the unit circle; two points `a` degrees apart are 2 sin(a / 2) apart
(1 degree: 0.0175, 3 degrees: 0.0524, 90 degrees: 1.414).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from service.selection_policy import (
    SKIP_REASONS,
    Candidate,
    RoundOutcome,
    SelectionConfig,
    WindowBudget,
    content_hash,
    select_round,
)

# Round numbers for hand computation: no random or novel lane unless a test asks for one.
CONFIG = SelectionConfig(
    uncertain_margin_percentile=10.0,
    uncertain_entropy_percentile=90.0,
    novel_percentile=99.0,
    junk_percentile=99.9,
    novel_lane_share=0.0,
    random_lane_share=0.0,
    max_class_share=1.0,
    dedup_distance=0.02,
    diversity_radius=0.4,
    fallback_max_margin=0.2,
    shortlist_factor=10,
)


def unit(degrees: float) -> np.ndarray:
    angle = math.radians(degrees)
    return np.array([math.cos(angle), math.sin(angle)], dtype=np.float32)


def apart(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


def candidate(
    event_id: str,
    degrees: float,
    *,
    margin: float = 0.1,
    margin_pct: float | None = 5.0,
    entropy_pct: float = 50.0,
    novelty_pct: float = 50.0,
    predicted: int = 0,
    content: str | None = None,
) -> Candidate:
    scores = {"max_probability": 0.5, "margin": margin, "entropy": 1.0, "novelty": 0.3}
    percentiles: dict[str, float] = {}
    if margin_pct is not None:
        percentiles = {
            "max_probability": 5.0,
            "margin": margin_pct,
            "entropy": entropy_pct,
            "novelty": novelty_pct,
        }
    return Candidate(
        event_id=event_id,
        content_hash=content if content is not None else f"hash-{event_id}",
        predicted=predicted,
        embedding=unit(degrees),
        scores=scores,
        percentiles=percentiles,
    )


def rows(*degrees: float) -> np.ndarray:
    return np.array([unit(d) for d in degrees], dtype=np.float32).reshape(-1, 2)


def run(
    candidates: list[Candidate],
    *,
    budget: int,
    config: SelectionConfig = CONFIG,
    known: np.ndarray | None = None,
    labeled: np.ndarray | None = None,
    seen: frozenset[str] = frozenset(),
    seed: int = 0,
) -> RoundOutcome:
    return select_round(
        candidates,
        known_embeddings=rows() if known is None else known,
        labeled_embeddings=rows() if labeled is None else labeled,
        seen_hashes=seen,
        budget=budget,
        config=config,
        rng=np.random.default_rng(seed),
    )


def ids(outcome: RoundOutcome) -> list[str]:
    return [s.event_id for s in outcome.selected]


def with_config(**changes: Any) -> SelectionConfig:
    return dataclasses.replace(CONFIG, **changes)


def accounted(outcome: RoundOutcome) -> int:
    return len(outcome.selected) + sum(outcome.skipped.values())


# --- settings -------------------------------------------------------------------------------


def test_defaults() -> None:
    config = SelectionConfig()
    assert (
        config.uncertain_margin_percentile,
        config.uncertain_entropy_percentile,
        config.novel_percentile,
        config.junk_percentile,
        config.novel_lane_share,
        config.random_lane_share,
        config.max_class_share,
        config.dedup_distance,
        config.diversity_radius,
        config.fallback_max_margin,
        config.shortlist_factor,
    ) == (10.0, 90.0, 99.0, 99.9, 0.1, 0.1, 0.5, 0.02, 0.4, 0.2, 10)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"uncertain_margin_percentile": 101.0}, "uncertain_margin_percentile must be within"),
        ({"novel_percentile": math.nan}, "novel_percentile must be within [0, 100], got nan"),
        ({"junk_percentile": 95.0}, "junk_percentile must be at least novel_percentile"),
        ({"random_lane_share": -0.1}, "random_lane_share must be within [0, 1], got -0.1"),
        ({"novel_lane_share": 0.6, "random_lane_share": 0.5}, "0.6 + 0.5"),
        ({"max_class_share": 0.0}, "max_class_share must be within (0, 1], got 0.0"),
        ({"dedup_distance": 2.5}, "dedup_distance must be within [0, 2], got 2.5"),
        ({"diversity_radius": 0.0}, "diversity_radius must be positive and finite, got 0.0"),
        ({"fallback_max_margin": 1.5}, "fallback_max_margin must be within [0, 1], got 1.5"),
        ({"shortlist_factor": 0}, "shortlist_factor must be at least 1, got 0"),
        ({"shortlist_factor": 2.5}, "shortlist_factor must be an int, got 2.5"),
    ],
)
def test_invalid_settings_name_the_value(changes: Mapping[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SelectionConfig(**changes)  # type: ignore[arg-type]


# --- content hash and window budget ---------------------------------------------------------


def test_content_hash_is_sha256_of_dtype_shape_and_bytes() -> None:
    data = np.arange(4, dtype="<f4").tobytes()
    expected = hashlib.sha256(b"float32:2,2\0" + data).hexdigest()
    assert content_hash(data, "float32", [2, 2]) == expected
    assert content_hash(data, "<f4", (2, 2)) == expected  # same dtype, other spelling
    assert content_hash(data, "float32", [4]) != expected
    assert content_hash(data, "int32", [2, 2]) != expected
    assert content_hash(data[:-1] + b"\x01", "float32", [2, 2]) != expected


def test_window_budget() -> None:
    hourly = WindowBudget(per_window=100, window_seconds=3600)
    assert hourly.window_start(7199.9) == 3600
    assert hourly.window_start(7200.0) == 7200
    assert hourly.remaining(7199.9, used=30, counted_window_start=3600) == 70
    assert hourly.remaining(7199.9, used=130, counted_window_start=3600) == 0
    # The count belongs to the previous window: the new one starts full.
    assert hourly.remaining(7200.0, used=100, counted_window_start=3600) == 100
    with pytest.raises(ValueError, match="window_seconds must be at least 1, got 0"):
        WindowBudget(per_window=1, window_seconds=0)
    with pytest.raises(ValueError, match="per_window must be at least 0, got -1"):
        WindowBudget(per_window=-1, window_seconds=60)
    with pytest.raises(ValueError, match="used must be at least 0, got -2"):
        hourly.remaining(0.0, used=-2, counted_window_start=0)


# --- edge cases -----------------------------------------------------------------------------


def test_no_candidates() -> None:
    assert run([], budget=10) == RoundOutcome(selected=[], skipped={})


def test_budget_zero_selects_nothing_and_says_why() -> None:
    events = [
        candidate("u", 0),
        candidate("n", 90, novelty_pct=99.5),
        candidate("x", 180, margin_pct=50.0),
    ]
    outcome = run(events, budget=0, config=with_config(random_lane_share=0.1))
    assert outcome == RoundOutcome(
        selected=[], skipped={"budget": 1, "lane_cap": 1, "not_candidate": 1}
    )


def test_negative_budget_and_mismatched_known_embeddings_raise() -> None:
    with pytest.raises(ValueError, match="budget must be at least 0, got -1"):
        run([candidate("a", 0)], budget=-1)
    with pytest.raises(ValueError, match=r"known_embeddings must have shape \(n, 2\)"):
        run([candidate("a", 0)], budget=1, known=np.zeros((3, 5), dtype=np.float32))


def test_invalid_embedding_is_skipped() -> None:
    bad = Candidate("bad", "h", 0, np.array([np.nan, 0.0], dtype=np.float32), {"margin": 0.0}, {})
    outcome = run([bad, candidate("a", 0)], budget=2)
    assert ids(outcome) == ["a"]
    assert outcome.skipped == {"invalid_embedding": 1}


# --- candidates and rules -------------------------------------------------------------------


def test_candidates_by_margin_or_entropy_percentile_with_rule_text() -> None:
    events = [
        candidate("margin", 0, margin=0.1, margin_pct=2.125),
        candidate("entropy", 90, margin=0.3, margin_pct=40.0, entropy_pct=95.25),
        candidate("both", 180, margin=0.2, margin_pct=10.0, entropy_pct=90.0),
        candidate("neither", 270, margin=0.05, margin_pct=10.5, entropy_pct=89.9),
    ]
    outcome = run(events, budget=4)
    rules = {s.event_id: s.rule for s in outcome.selected}
    assert rules == {
        "margin": "margin percentile 2.125 <= 10",
        "entropy": "entropy percentile 95.25 >= 90",
        "both": "margin percentile 10 <= 10 and entropy percentile 90 >= 90",
    }
    assert outcome.skipped == {"not_candidate": 1}
    assert {s.lane for s in outcome.selected} == {"uncertain"}


def test_without_percentiles_raw_margin_decides() -> None:
    events = [
        candidate("low", 0, margin=0.15, margin_pct=None),
        candidate("high", 90, margin=0.5, margin_pct=None),
    ]
    outcome = run(events, budget=2)
    assert ids(outcome) == ["low"]
    assert outcome.selected[0].rule == "margin 0.15 <= 0.2 (no reference percentile)"
    assert outcome.skipped == {"not_candidate": 1}


def test_priority_is_uncertainty_when_far_apart_and_sorts_the_selection() -> None:
    events = [
        candidate("b", 0, margin=0.3),
        candidate("a", 90, margin=0.1),
        candidate("c", 180, margin=0.2),
    ]
    outcome = run(events, budget=3)
    assert ids(outcome) == ["a", "c", "b"]
    assert [s.priority for s in outcome.selected] == pytest.approx([0.9, 0.8, 0.7], rel=1e-6)


def test_reasons_record_scores_thresholds_and_distances() -> None:
    event = candidate("a", 0, margin=0.25, margin_pct=3.0)
    outcome = run([event], budget=1, known=rows(60, 90), labeled=rows(90))
    (selection,) = outcome.selected
    # Nearest labeled is 90 degrees away; the queued point at 60 degrees is nearer still.
    assert selection.nearest_labeled_distance == pytest.approx(apart(90), rel=1e-6)
    reasons = dict(selection.reasons)
    assert reasons.pop("nearest_known_distance") == pytest.approx(apart(60), rel=1e-6)
    assert reasons.pop("uncertainty") == pytest.approx(0.75)
    assert reasons == {
        "predicted": 0,
        "scores": {"max_probability": 0.5, "margin": 0.25, "entropy": 1.0, "novelty": 0.3},
        "percentiles": {"max_probability": 5.0, "margin": 3.0, "entropy": 50.0, "novelty": 50.0},
        "thresholds": {
            "uncertain_margin_percentile": 10.0,
            "uncertain_entropy_percentile": 90.0,
            "fallback_max_margin": 0.2,
            "dedup_distance": 0.02,
            "diversity_radius": 0.4,
            "max_class_share": 1.0,
        },
        "diversity": 1.0,
        "junk": False,
    }


def test_nearest_labeled_distance_is_none_without_labels() -> None:
    outcome = run([candidate("a", 0)], budget=1)
    assert outcome.selected[0].nearest_labeled_distance is None
    assert outcome.selected[0].reasons["nearest_known_distance"] is None


# --- duplicates -----------------------------------------------------------------------------


def test_duplicate_hashes_are_skipped_seen_before_or_in_the_same_round() -> None:
    events = [
        candidate("seen", 0, content="old"),
        candidate("first", 90, content="same"),
        candidate("second", 180, content="same"),
        candidate("other", 270),
    ]
    outcome = run(events, budget=4, seen=frozenset({"old"}))
    assert sorted(ids(outcome)) == ["first", "other"]
    assert outcome.skipped == {"duplicate_hash": 2}


def test_near_duplicates_of_known_embeddings_are_skipped() -> None:
    events = [candidate("close", 1.0, margin=0.0), candidate("far", 10.0, margin=0.5)]
    outcome = run(events, budget=2, known=rows(0))
    assert ids(outcome) == ["far"]
    assert outcome.skipped == {"near_duplicate": 1}


def test_near_duplicates_of_earlier_picks_are_skipped() -> None:
    events = [candidate("a", 0, margin=0.1), candidate("twin", 1.0, margin=0.1)]
    outcome = run(events, budget=2)
    assert ids(outcome) == ["a"]
    assert outcome.skipped == {"near_duplicate": 1}


def test_shortlist_is_extended_when_its_members_are_near_duplicates() -> None:
    events = [
        candidate("dup1", 0.5, margin=0.0),
        candidate("dup2", 180.5, margin=0.0),
        candidate("ok1", 90, margin=0.3),
        candidate("ok2", 270, margin=0.4),
    ]
    config = with_config(shortlist_factor=1)
    outcome = run(events, budget=2, config=config, known=rows(0, 180))
    assert ids(outcome) == ["ok1", "ok2"]
    assert outcome.skipped == {"near_duplicate": 2}


# --- diversity ------------------------------------------------------------------------------


def test_diversity_picks_the_different_point_before_the_near_twin() -> None:
    events = [
        candidate("a", 0, margin=0.1),
        candidate("twin", 3, margin=0.1),  # 0.052 from a: not a duplicate, but redundant
        candidate("different", 90, margin=0.2),
    ]
    outcome = run(events, budget=3)
    assert ids(outcome) == ["a", "different", "twin"]
    assert [s.priority for s in outcome.selected] == pytest.approx(
        [0.9, 0.8, 0.9 * apart(3) / 0.4], rel=1e-4
    )
    assert outcome.selected[2].reasons["diversity"] == pytest.approx(apart(3) / 0.4, rel=1e-4)


def test_known_embeddings_count_for_diversity() -> None:
    # b is the most uncertain but sits 10 degrees from a queued sample.
    events = [candidate("b", 10, margin=0.0), candidate("c", 90, margin=0.3)]
    outcome = run(events, budget=1, known=rows(0))
    assert ids(outcome) == ["c"]
    assert outcome.skipped == {"budget": 1}


def test_picks_of_a_seeded_mixture_cover_its_clusters() -> None:
    rng = np.random.default_rng(7)
    centres = np.linalg.qr(rng.normal(size=(16, 8)))[0].T  # 8 orthonormal directions in 16-D
    members = rng.integers(0, 8, size=400)
    # One cluster is twice as uncertain as the rest, so margin alone would stay inside it.
    margins = rng.uniform(0.0, 0.2, size=400) + np.where(members == 3, 0.0, 0.2)
    points = centres[members] + rng.normal(scale=0.02, size=(400, 16))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    events = [
        Candidate(
            f"e{i}",
            f"h{i}",
            0,
            points[i].astype(np.float32),
            {"margin": float(margins[i])},
            {"margin": 1.0},
        )
        for i in range(400)
    ]
    outcome = run(events, budget=8)
    picked = {int(members[int(s.event_id[1:])]) for s in outcome.selected}
    by_margin_only = {int(members[i]) for i in np.argsort(margins)[:8]}
    assert by_margin_only == {3}
    assert picked == set(range(8))


# --- lanes, quotas and budget ---------------------------------------------------------------


def test_budget_is_respected() -> None:
    events = [candidate(f"e{i}", 30 * i, margin=0.01 * i) for i in range(12)]
    outcome = run(events, budget=3)
    assert ids(outcome) == ["e0", "e1", "e2"]
    assert outcome.skipped == {"budget": 9}


def test_novel_lane_is_capped_and_novel_points_never_use_the_uncertain_lane() -> None:
    config = with_config(novel_lane_share=0.2)
    novel = [candidate(f"n{i}", 20 * i, margin=0.0, novelty_pct=99.0 + 0.1 * i) for i in range(4)]
    uncertain = [candidate(f"u{i}", 200 + 20 * i, margin=0.5) for i in range(4)]
    outcome = run(novel + uncertain, budget=5, config=config)
    lanes = {s.event_id: s.lane for s in outcome.selected}
    # Cap round(5 x 0.2) = 1: the most novel non-junk point; the uncertain lane takes 4.
    assert lanes == {"n3": "novel"} | {f"u{i}": "uncertain" for i in range(4)}
    assert outcome.skipped == {"lane_cap": 3}
    (novel_pick,) = [s for s in outcome.selected if s.lane == "novel"]
    assert novel_pick.rule == "novelty percentile 99.3 >= 99"
    assert novel_pick.priority == pytest.approx(0.993, rel=1e-6)


def test_junk_is_picked_only_when_no_other_novel_point_is_left() -> None:
    config = with_config(novel_lane_share=0.5)
    events = [
        candidate("junk1", 0, novelty_pct=100.0),
        candidate("novel", 90, novelty_pct=99.2),
        candidate("junk2", 180, novelty_pct=100.0),
    ]
    outcome = run(events, budget=4, config=config)
    assert ids(outcome) == ["novel", "junk1"]
    junk = outcome.selected[1]
    assert junk.priority == 0.0
    assert junk.reasons["junk"] is True
    assert junk.rule == (
        "novelty percentile 100 >= 99.9: probable junk, picked after the lane's other candidates"
    )
    assert outcome.skipped == {"lane_cap": 1}
    # With a second non-junk novel point, no junk is picked at all.
    outcome = run([*events, candidate("novel2", 270, novelty_pct=99.0)], budget=4, config=config)
    assert ids(outcome) == ["novel", "novel2"]
    assert outcome.skipped == {"lane_cap": 2}


def test_class_quota_across_targeted_lanes() -> None:
    config = with_config(max_class_share=0.5, novel_lane_share=0.25)
    events = [
        candidate("n0", 0, novelty_pct=99.5, predicted=0),
        candidate("a0", 45, margin=0.0, predicted=0),
        candidate("b0", 90, margin=0.1, predicted=0),
        candidate("c1", 135, margin=0.3, predicted=1),
        candidate("d1", 180, margin=0.4, predicted=1),
        candidate("e1", 225, margin=0.5, predicted=1),
    ]
    # Quota ceil(4 x 0.5) = 2 per class; the novel pick already uses one of class 0.
    outcome = run(events, budget=4, config=config)
    assert ids(outcome) == ["a0", "n0", "c1", "d1"]
    assert outcome.skipped == {"class_quota": 1, "budget": 1}


def test_random_lane_size_and_source_and_reproducibility() -> None:
    config = with_config(random_lane_share=0.1)
    events = [candidate("u", 0, margin=0.0)] + [
        candidate(f"x{i}", 5 + 3 * i, margin_pct=50.0) for i in range(100)
    ]
    outcome = run(events, budget=15, config=config, seed=3)
    # round(15 x 0.1) = 2 random picks (half up), drawn from events that are not candidates.
    random_picks = [s for s in outcome.selected if s.lane == "random"]
    assert len(random_picks) == 2
    assert all(s.event_id.startswith("x") for s in random_picks)
    assert random_picks[0].rule == "random lane: uniform sample, 10% of the budget"
    assert accounted(outcome) == len(events)
    again = run(events, budget=15, config=config, seed=3)
    assert ids(again) == ids(outcome)
    assert [s.priority for s in again.selected] == [s.priority for s in outcome.selected]
    other = run(events, budget=15, config=config, seed=4)
    assert ids(other) != ids(outcome)


def test_random_lane_rounds_half_up() -> None:
    config = with_config(random_lane_share=0.1)
    events = [candidate(f"x{i}", 7 * i, margin_pct=50.0) for i in range(40)]
    assert len(run(events, budget=5, config=config).selected) == 1
    assert len(run(events, budget=4, config=config).selected) == 0


def test_random_lane_skips_near_duplicates_and_ignores_class_quota() -> None:
    config = with_config(random_lane_share=0.5, max_class_share=0.5)
    # Every non-candidate but "fresh" is a near-duplicate of a known sample.
    events = [candidate("u", 90, margin=0.0, predicted=1)] + [
        candidate(f"dup{i}", 0.5, margin_pct=50.0, predicted=1) for i in range(5)
    ]
    events.append(candidate("fresh", 180, margin_pct=50.0, predicted=1))
    for seed in range(5):
        outcome = run(events, budget=2, config=config, known=rows(0), seed=seed)
        assert ids(outcome) == ["u", "fresh"]  # priorities 1.0 and 0.9
        assert {s.event_id: s.lane for s in outcome.selected} == {
            "u": "uncertain",
            "fresh": "random",
        }
        assert accounted(outcome) == len(events)
        assert set(outcome.skipped) <= {"near_duplicate", "not_candidate"}


def test_random_lane_never_repeats_a_targeted_pick() -> None:
    config = with_config(random_lane_share=0.5)
    events = [candidate("a", 0), candidate("b", 90)]
    for seed in range(5):
        outcome = run(events, budget=2, config=config, seed=seed)
        assert sorted(ids(outcome)) == ["a", "b"]
        assert sorted(s.lane for s in outcome.selected) == ["random", "uncertain"]


def test_every_event_is_accounted_for_once() -> None:
    config = with_config(random_lane_share=0.2, novel_lane_share=0.2, max_class_share=0.5)
    rng = np.random.default_rng(11)
    events = [
        candidate(
            f"e{i}",
            float(rng.uniform(0, 360)),
            margin=float(rng.uniform()),
            margin_pct=float(rng.uniform(0, 100)),
            novelty_pct=float(rng.uniform(90, 100)),
            predicted=int(rng.integers(0, 3)),
            content=f"h{i % 180}",
        )
        for i in range(200)
    ]
    outcome = run(events, budget=10, config=config, known=rows(*range(0, 360, 40)))
    assert accounted(outcome) == 200
    assert set(outcome.skipped) <= set(SKIP_REASONS)
    assert outcome.skipped["duplicate_hash"] == 20
    assert len(outcome.selected) == 10
    assert len({s.event_id for s in outcome.selected}) == 10


def test_unused_novel_slots_go_to_the_uncertain_lane() -> None:
    events = [candidate(f"u{i}", 40 * i, margin=0.1 * i) for i in range(6)]
    outcome = run(events, budget=5, config=with_config(novel_lane_share=0.2))
    assert ids(outcome) == ["u0", "u1", "u2", "u3", "u4"]


def test_known_rows_with_nan_are_ignored() -> None:
    known = np.vstack([rows(0), np.full((1, 2), np.nan, dtype=np.float32)])
    outcome = run([candidate("a", 90)], budget=1, known=known)
    assert outcome.selected[0].reasons["nearest_known_distance"] == pytest.approx(apart(90))
