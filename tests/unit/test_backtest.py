"""The backtest a user runs on their own payload (``deployflag backtest``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest

from deployflag.backtest_cli import render_table
from deployflag.messages import parse_request, validate_request
from deployflag.pipeline import backtest, events, fix_rate, forecast, pair_events
from deployflag.pipeline.config import PipelineConfig
from deployflag.synthetic import generate
from tests.unit.rows import ROOT_EXAMPLES, hist, one_thread, request


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def _steady(shortcode: str, every: int) -> list[dict[str, object]]:
    """100 days of default-branch counts that drop by one every ``every`` days (0: never)."""
    rows, count = [], 50
    for day in range(100):
        if every and day % every == 0 and day:
            count -= 1
        rows.append(hist(day, count, shortcode=shortcode))
    return rows


def test_a_known_order_is_found_by_the_default_scoring() -> None:
    # Given three shortcodes whose habits hold across the cut: A fixes often, B sometimes, C never
    req = request(historical=_steady("A", 2) + _steady("B", 5) + _steady("C", 0))
    report = backtest.run(req, PipelineConfig())
    assert report.enough_data
    assert (report.shortcodes_before, report.shortcodes_compared) == (3, 3)
    default = next(c for c in report.candidates if c.is_default)
    # Then the default's weights order them as their later fixes do
    assert default.spearman == 1.0
    # And the top third (A) holds A's share of the later fixes
    later_a, later_b = 10, 4  # drops on days 80…98 (every 2nd) and 80, 85, 90, 95
    assert default.top_third_share == round(later_a / (later_a + later_b), 4)
    assert "keep the defaults" in report.verdict


def test_every_candidate_is_reported_once() -> None:
    req = validate_request(generate("reference", seed=2))
    report = backtest.run(req, PipelineConfig())
    keys = [(c.scoring, c.recency, c.model_weight) for c in report.candidates]
    assert keys == [("seed", None, None)] + [
        ("forecast", r, w) for r in ("none", "60", "auto") for w in (0.0, 0.2, 0.5)
    ]
    for c in report.candidates:
        assert c.spearman is not None
        assert -1.0 <= c.spearman <= 1.0
        assert c.top_third_share is not None
        assert 0.0 <= c.top_third_share <= 1.0
    # The later events are the pair events after the 80 % point, counted independently
    cols = events.columns(req)
    cut = fix_rate.backtest_cut(*forecast.time_span(cols))
    later = pair_events.build(cols).time > cut
    assert report.later_events == int(later.sum())
    # The candidates' weights come from the rows before the cut only
    assert report.cut.timestamp() * 1e6 == pytest.approx(cut, abs=1)
    assert np.isfinite([c.roc_auc or 0.0 for c in report.candidates]).all()


def test_a_small_payload_gets_no_verdict() -> None:
    req = parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes())
    report = backtest.run(req, PipelineConfig())
    assert not report.enough_data
    assert report.verdict.startswith("too small for a verdict")
    assert all(c.spearman is None for c in report.candidates)


def test_a_clearly_better_candidate_is_advised() -> None:
    report = backtest.BacktestReport(
        repo_id=1,
        cut=datetime(2021, 1, 1, tzinfo=UTC),
        shortcodes_before=5,
        shortcodes_compared=5,
        later_events=100,
        later_fixes=10,
        candidates=[
            backtest.Candidate(
                scoring="seed",
                recency=None,
                model_weight=None,
                spearman=0.9,
                top_third_share=0.5,
                roc_auc=None,
                half_life_days=None,
            ),
            backtest.Candidate(
                scoring="forecast",
                recency="auto",
                model_weight=0.0,
                spearman=0.5,
                top_third_share=0.4,
                roc_auc=None,
                half_life_days=None,
            ),
        ],
        verdict="",
        enough_data=True,
    )
    text = backtest.verdict(report)
    assert text.startswith("DEPLOYFLAG_SCORING=seed ranked best here (Spearman 0.900 vs 0.500")


def test_the_table_shows_every_candidate_and_the_verdict() -> None:
    req = request(historical=_steady("A", 2) + _steady("B", 5) + _steady("C", 0))
    report = backtest.run(req, PipelineConfig())
    text = render_table(report)
    lines = text.splitlines()
    assert lines[-1] == f"verdict: {report.verdict}"
    header = next(i for i, line in enumerate(lines) if line.startswith("scoring"))
    assert len(lines[header + 2 : header + 2 + len(report.candidates)]) == 10
    assert lines[header + 2].split()[0] == "seed"
