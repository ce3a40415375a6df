"""Seed scoring's issue weights: the original computation, to the digit."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from deployflag.messages import parse_request
from deployflag.pipeline import compute, events, features, run, scoring
from deployflag.pipeline.config import PipelineConfig, Weights
from tests.unit.rows import ROOT_EXAMPLES, daily, hist, one_thread, request

SEED = PipelineConfig(scoring="seed")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def test_worked_example_weights() -> None:
    result = run((ROOT_EXAMPLES / "worked-example.json").read_bytes(), SEED)
    assert (result.repo_id, result.scoring) == (42, "seed")
    assert result.model.trained is False
    assert result.model.skipped_reason == "one_class"
    [score] = result.scores
    assert score.model_dump() == {
        "issue_shortcode": "PYL-W0611",
        "issue_weight": 41,
        "fix_probability": 0.0,
        "daily_weighted_fix_rate": 0.5714,
        "historical_weighted_fix_rate": 0.4,
        "severity_score": 60,
        "fix_rate": None,
        "events": 3,
    }


def test_weighted_fix_rates_weigh_later_events_more() -> None:
    code = np.array([0, 0, 0, 2], dtype=np.int64)
    rate = np.array([1.0, 0.0, 0.5, 0.25])
    everything = np.ones(4, dtype=np.bool_)
    # (1·1 + 0·2 + 0.5·3) / 6 = 0.41666… → 0.4167; shortcode 1 has none → 0.
    assert scoring.weighted_fix_rates(code, rate, everything, 3) == [0.4167, 0.0, 0.25]
    only_first = np.array([True, False, False, False])
    assert scoring.weighted_fix_rates(code, rate, only_first, 3) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("score", "weight"),
    [(0.0, 0), (0.41142, 41), (0.125, 12), (0.375, 38), (1.0, 100), (1.0000001, 100)],
)
def test_issue_weight_rounds_half_to_even_and_caps(score: float, weight: int) -> None:
    assert scoring.issue_weight(score) == weight


def test_shortcode_without_events_is_scored_from_severity_alone() -> None:
    req = request(
        historical=[
            hist(0, 1, shortcode="CRIT", severity="critical"),
            hist(1, 2, shortcode="CRIT", severity="critical"),
        ]
    )
    [score] = compute(req, SEED).scores
    # 0.2 · 0.82 = 0.164 → 16
    assert (score.issue_shortcode, score.issue_weight, score.severity_score) == ("CRIT", 16, 82)
    assert score.daily_weighted_fix_rate == score.historical_weighted_fix_rate == 0.0


def test_scores_sorted_by_weight_then_shortcode() -> None:
    req = request(
        [
            daily(0, 1, shortcode="B", severity="minor"),
            daily(0, 1, shortcode="A", severity="minor"),
            daily(0, 1, shortcode="C", severity="critical"),
        ]
    )
    scores = compute(req, SEED).scores
    assert [(s.issue_shortcode, s.issue_weight) for s in scores] == [("C", 16), ("A", 5), ("B", 5)]


def test_custom_weights() -> None:
    req = parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes())
    config = PipelineConfig(scoring="seed", weights=Weights(w1=1.0, w2=0.0, w3=0.0, w4=0.0))
    assert compute(req, config).scores[0].issue_weight == 57  # 0.5714 → 57


def test_fix_probability_is_unrounded_in_the_score_and_rounded_in_the_result() -> None:
    req = request([daily(0, 1, severity="info")])
    cols = events.columns(req)
    info = features.shortcode_info(req, cols)
    rows = features.build(events.build(cols), info, 20)
    only_p = Weights(w1=0.0, w2=0.0, w3=1.0, w4=0.0)
    # 0.0149996 → 1.49996 → 1; rounded first it would be 0.015 → 1.5 → 2.
    [score] = scoring.scores(rows, info, np.array([0.0149996]), only_p)
    assert (score.fix_probability, score.issue_weight) == (0.015, 1)
