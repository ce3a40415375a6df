"""Properties of the whole computation, on requests that hypothesis makes up."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployflag.errors import InvalidRequest
from deployflag.messages import Computation, validate_request
from deployflag.pipeline import compute, run
from deployflag.pipeline.config import PipelineConfig
from tests.unit.rows import at, build_events, one_thread

CONFIG = PipelineConfig()
BOTH = pytest.mark.parametrize(
    "config",
    [PipelineConfig(scoring="seed"), PipelineConfig(scoring="forecast")],
    ids=["seed", "forecast"],
)
# One type and severity per shortcode: otherwise a shuffle would change which row is "first".
SHORTCODES = {
    "PYL-W0611": ("Anti-pattern", "major"),
    "GSC-G104": ("Security", "critical"),
    "JS-0002": ("Style", "minor"),
    "XX-1": ("Secrets", None),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@st.composite
def payloads(draw: st.DrawFn, max_rows: int = 40) -> dict[str, Any]:
    """A request dict whose timestamps are all distinct."""
    n_daily = draw(st.integers(0, max_rows))
    n_hist = draw(st.integers(0, max_rows))
    minutes = draw(
        st.lists(
            st.integers(0, 200 * 24 * 60),
            min_size=n_daily + n_hist,
            max_size=n_daily + n_hist,
            unique=True,
        )
    )
    code = st.sampled_from(sorted(SHORTCODES))
    freq = st.integers(0, 12)
    analysis = []
    for m in minutes[:n_daily]:
        sc = draw(code)
        analysis.append(
            {
                "branch_name": draw(st.sampled_from(["main-fix", "feature-1", "feature-2"])),
                "base_oid": draw(st.sampled_from([None, "b1", "b2"])),
                "created_at": at(m / 1440),
                "shortcode": sc,
                "frequency_detected": draw(freq),
                "issue_type": SHORTCODES[sc][0],
                "severity": SHORTCODES[sc][1],
            }
        )
    historical = []
    for m in minutes[n_daily:]:
        sc = draw(code)
        historical.append(
            {
                "timestamp": at(m / 1440),
                "shortcode": sc,
                "frequency": draw(freq),
                "issue_type": SHORTCODES[sc][0],
                "severity": SHORTCODES[sc][1],
            }
        )
    return {"repo_id": 7, "analysis_run": analysis, "historical_run": historical}


def weights(result: Computation) -> list[tuple[Any, ...]]:
    return [
        (
            s.issue_shortcode,
            s.issue_weight,
            s.fix_probability,
            s.daily_weighted_fix_rate,
            s.historical_weighted_fix_rate,
            s.severity_score,
            s.fix_rate,
            s.events,
        )
        for s in result.scores
    ]


@settings(max_examples=150, deadline=None)
@given(payloads(max_rows=60))
def test_events_are_well_formed(payload: dict[str, Any]) -> None:
    ev = build_events(validate_request(payload))
    assert ((ev.fix_rate >= 0) & (ev.fix_rate <= 1)).all()
    assert (ev.frequency_detected >= 0).all()
    assert (np.diff(ev.code) >= 0).all()  # grouped by shortcode
    assert int((~ev.daily).sum()) <= len(payload["historical_run"])
    assert int(ev.daily.sum()) <= len(payload["analysis_run"])


@BOTH
@settings(max_examples=40, deadline=None)
@given(payload=payloads())
def test_scores_are_in_range_and_cover_every_shortcode(
    config: PipelineConfig, payload: dict[str, Any]
) -> None:
    result = compute(validate_request(payload), config)
    assert result.scoring == config.scoring
    seen = {r["shortcode"] for r in payload["analysis_run"] + payload["historical_run"]}
    assert sorted(s.issue_shortcode for s in result.scores) == sorted(seen)
    for s in result.scores:
        assert 0 <= s.issue_weight <= 100
        assert 0.0 <= s.fix_probability <= 1.0
        assert 0.0 <= s.daily_weighted_fix_rate <= 1.0
        assert 0.0 <= s.historical_weighted_fix_rate <= 1.0
        assert s.fix_rate is None if config.scoring == "seed" else 0.0 <= s.fix_rate <= 1.0
        assert s.events >= 0
    keys = [(-s.issue_weight, s.issue_shortcode) for s in result.scores]
    assert keys == sorted(keys)
    if result.model.roc_auc is not None:
        assert 0.0 <= result.model.roc_auc <= 1.0


@BOTH
@settings(max_examples=25, deadline=None)
@given(payload=payloads(), rnd=st.randoms(use_true_random=False))
def test_deterministic_and_shuffle_invariant(
    config: PipelineConfig, payload: dict[str, Any], rnd: Any
) -> None:
    first = compute(validate_request(payload), config)
    again = compute(validate_request(payload), config)
    assert weights(again) == weights(first)
    shuffled = dict(payload)
    for key in ("analysis_run", "historical_run"):
        rows = list(payload[key])
        rnd.shuffle(rows)
        shuffled[key] = rows
    other = compute(validate_request(shuffled), config)
    assert weights(other) == weights(first)
    assert other.model.model_dump(exclude={"training_seconds"}) == first.model.model_dump(
        exclude={"training_seconds"}
    )


@BOTH
def test_empty_lists_give_an_empty_result(config: PipelineConfig) -> None:
    body = orjson.dumps({"repo_id": "r-1", "analysis_run": [], "historical_run": []})
    result = run(body, config)
    assert result.repo_id == "r-1"
    assert result.scores == []
    assert (result.model.trained, result.model.skipped_reason) == (False, "no_rows")


def test_run_rejects_an_invalid_body() -> None:
    with pytest.raises(InvalidRequest) as caught:
        run(b'{"repo_id": 1, "analysis_run": []}', CONFIG)
    assert caught.value.reason == "missing_field"


def test_entry_points_are_picklable() -> None:
    # The service sends them to process-pool workers.
    assert pickle.loads(pickle.dumps(run)) is run
    assert pickle.loads(pickle.dumps(compute)) is compute
    assert pickle.loads(pickle.dumps(CONFIG)) == CONFIG
