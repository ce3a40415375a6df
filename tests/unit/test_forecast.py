"""Forecast scoring, rule by rule, on examples small enough to compute by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployflag.messages import TrainingResult, encode_json_reply, parse_request
from deployflag.pipeline import compute, events, fix_rate, forecast, forecast_model, pair_events
from deployflag.pipeline.config import ForecastSpec, PipelineConfig
from deployflag.synthetic import generate
from tests.unit.rows import ROOT_EXAMPLES, daily, hist, micros, one_thread, request

FORECAST = PipelineConfig()  # the default
NO_RECENCY = PipelineConfig(recency="none")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


def pairs_of(req_rows: dict[str, list[dict[str, object]]]) -> pair_events.PairEvents:
    req = request(req_rows.get("analysis"), req_rows.get("historical"))
    return pair_events.build(events.columns(req))


# --- events ----------------------------------------------------------------------------------


def test_historical_pairs_skip_zero_counts_and_rises_are_unfixed_events() -> None:
    # Given counts 0 → 3 → 3 → 1 → 0 → 2 on the default branch
    ev = pairs_of({"historical": [hist(d, f) for d, f in enumerate([0, 3, 3, 1, 0, 2])]})
    # Then the pairs starting at 0 give nothing; 3→3 is unfixed, 3→1 and 1→0 are fixes
    assert ev.time.tolist() == [micros(2), micros(3), micros(4)]
    assert ev.frequency.tolist() == [3, 3, 1]
    assert ev.fix_rate.tolist() == [0.0, 0.6667, 1.0]
    assert ev.label.tolist() == [0, 1, 1]
    assert not ev.daily.any()


def test_a_rise_is_an_event_with_fix_rate_zero() -> None:
    ev = pairs_of({"historical": [hist(0, 2), hist(1, 5)]})
    assert (ev.frequency.tolist(), ev.fix_rate.tolist()) == ([2], [0.0])


def test_daily_pairs_stay_inside_their_segment() -> None:
    # Given one branch with two base_oids (and a null one, which is dropped), and another branch
    rows = [
        daily(0, 4, base="a1"),
        daily(1, 2, base="a1"),
        daily(2, 9, base=None),  # dropped: the branch has more than one base_oid
        daily(3, 5, base="a2"),
        daily(4, 5, base="a2"),
        daily(5, 6, branch="feature-2", base=None),
        daily(6, 3, branch="feature-2", base=None),
    ]
    ev = pairs_of({"analysis": rows})
    # Then a1 gives 4→2, a2 gives 5→5, feature-2 gives 6→3; no pair crosses a boundary
    assert ev.time.tolist() == [micros(1), micros(4), micros(6)]
    assert ev.frequency.tolist() == [4, 5, 6]
    assert ev.fix_rate.tolist() == [0.5, 0.0, 0.5]
    assert ev.daily.all()


def test_events_in_time_order_historical_first_on_ties() -> None:
    ev = pairs_of(
        {
            "analysis": [daily(0, 2), daily(2, 1)],
            "historical": [hist(1, 4), hist(2, 4), hist(3, 1)],
        }
    )
    assert ev.time.tolist() == [micros(2), micros(2), micros(3)]
    assert ev.daily.tolist() == [False, True, False]


# --- fix rate ------------------------------------------------------------------------------


def test_group_prior_with_an_empty_group_uses_the_repository_rate() -> None:
    # Given A and B (major) with rates [1, 0] and [0, 0], C (critical) without events, D (minor)
    code = np.array([0, 0, 1, 1, 3])
    rate = np.array([1.0, 0.0, 0.0, 0.0, 0.5])
    severity = np.array([60, 60, 82, 25])
    e = fix_rate.smoothed(code, rate, np.ones(5), severity, prior_strength=20)
    # μ_major = 1/4; μ_minor = 0.5; the critical group has no events: the repository's 1.5/5
    assert e.tolist() == pytest.approx([(1 + 20 * 0.25) / 22, (0 + 20 * 0.25) / 22, 0.3, 0.5])


def test_no_event_at_all_gives_zero() -> None:
    e = fix_rate.smoothed(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.array([60]), 20)
    assert e.tolist() == [0.0]


def test_recency_weights_halve_every_half_life() -> None:
    t_end = micros(200)
    time = np.array([micros(200), micros(140), micros(80), micros(170)])
    assert fix_rate.recency_weights(time, t_end, 60.0).tolist() == pytest.approx(
        [1.0, 0.5, 0.25, 2**-0.5]
    )
    assert fix_rate.recency_weights(time, t_end, None).tolist() == [1.0] * 4


def test_recency_weighs_the_sums_of_the_smoothed_rate() -> None:
    # n = 1 + 0.5, S = 1·0 + 0.5·1; one shortcode: μ = S / n
    code = np.array([0, 0])
    w = fix_rate.recency_weights(np.array([micros(60), micros(0)]), micros(60), 60.0)
    e = fix_rate.smoothed(code, np.array([0.0, 1.0]), w, np.array([60]), 20)
    assert e.tolist() == pytest.approx([(0.5 + 20 * (0.5 / 1.5)) / (1.5 + 20)])


def _drifting(shortcodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shortcodes whose old habits are the reverse of their new ones (events every day)."""
    code, time, rate = [], [], []
    for c in range(shortcodes):
        old, new = 1 - c / shortcodes, c / shortcodes
        for day in range(1000):
            if 400 <= day < 700:
                continue
            recent = day >= 700
            code.append(c)
            time.append(micros(day))
            # fixed on a share `old` or `new` of the days, spread evenly
            share = new if recent else old
            rate.append(1.0 if (day * share) % 1 + share >= 1 else 0.0)
    return np.array(code), np.array(time), np.array(rate), np.full(shortcodes, 60)


def test_auto_recency_picks_60_days_when_the_backtest_shows_it() -> None:
    code, time, rate, severity = _drifting(8)
    chosen = fix_rate.choose(code, time, rate, severity, micros(0), micros(999), 20)
    assert chosen.half_life == 60.0
    assert chosen.spearman is not None
    assert chosen.spearman > 0.9


def test_auto_recency_needs_eight_shortcodes_with_twenty_later_events() -> None:
    code, time, rate, severity = _drifting(7)
    chosen = fix_rate.choose(code, time, rate, severity, micros(0), micros(999), 20)
    assert (chosen.half_life, chosen.spearman) == (None, None)


def test_recency_guard_keeps_none_on_a_small_payload() -> None:
    result = compute(parse_request(_body(generate("small", seed=3))), FORECAST)
    assert (result.model.half_life_days, result.model.backtest_spearman) == (None, None)


def test_spearman_uses_average_ranks_and_is_undefined_for_constants() -> None:
    assert fix_rate.spearman(np.array([1.0, 2, 2, 3]), np.array([1.0, 2, 3, 4])) == pytest.approx(
        0.9486833
    )
    assert fix_rate.spearman(np.array([1.0, 1.0]), np.array([1.0, 2.0])) is None


# --- the model's inputs --------------------------------------------------------------------


def _one_shortcode() -> pair_events.PairEvents:
    """Historical events on days 0, 10, 50, 70 with fix rates 0.5, 0, 0, 0.25."""
    return pair_events.PairEvents(
        code=np.zeros(4, np.int64),
        time=np.array([micros(d) for d in (0, 10, 50, 70)]),
        frequency=np.array([4, 2, 2, 4]),
        fix_rate=np.array([0.5, 0.0, 0.0, 0.25]),
        daily=np.zeros(4, np.bool_),
    )


def test_an_events_inputs_come_from_earlier_events_only() -> None:
    data = forecast_model.rows(_one_shortcode(), np.array([60]), micros(89), np.array([3]), 20)
    first, last = data.x[0], data.x[3]
    assert np.isnan(first[:5]).all()  # no earlier event: the ratios are undefined
    assert first[5:].tolist() == [0.0, 0.0, 0.0, 60.0, 0.0, 0.0, 0.0, math.log1p(4), 0.0, 0.0]
    # Day 70: earlier y = 1, 0, 0; the 30-day window holds day 50 only; last fix 70 days ago
    assert last.tolist() == pytest.approx(
        [
            1 / 3,
            0.5 / 3,
            1 / 3,
            1 / 3,
            0.0,
            0.0,
            0.0,
            0.0,
            60.0,
            math.log1p(3),
            math.log1p(20),
            math.log1p(70),
            math.log1p(4),
            0.0,
            1.0,
        ]
    )
    assert data.y.tolist() == [1, 0, 0, 1]


def test_the_forecast_row_is_a_historical_event_at_the_payloads_end() -> None:
    # t_end = day 89: the window holds day 70 (a fix); the last fix is 19 days old: Short; the
    # frequency is the last default-branch count (3)
    data = forecast_model.rows(_one_shortcode(), np.array([60]), micros(89), np.array([3]), 20)
    assert data.forecast_codes.tolist() == [0]
    assert data.forecast_x[0].tolist() == pytest.approx(
        [
            0.5,
            0.1875,
            0.5,
            0.5,
            1.0,
            0.25,
            0.0,
            0.0,
            60.0,
            math.log1p(4),
            math.log1p(19),
            math.log1p(89),
            math.log1p(3),
            1.0,
            0.0,
        ]
    )


def test_the_forecast_row_takes_the_last_events_count_without_a_historical_one() -> None:
    data = forecast_model.rows(_one_shortcode(), np.array([60]), micros(89), np.array([0]), 20)
    assert data.forecast_x[0][12] == pytest.approx(math.log1p(4))


def test_same_source_share_and_last_ten() -> None:
    ev = pair_events.PairEvents(
        code=np.zeros(13, np.int64),
        time=np.array([micros(d) for d in range(13)]),
        frequency=np.full(13, 5),
        fix_rate=np.array([1.0, 0.0] + [0.0] * 10 + [0.5]),
        daily=np.array([False, True] + [True] * 11),
    )
    x = forecast_model.rows(ev, np.array([25]), micros(13), np.array([0]), 20).x
    # Event 2 (daily): earlier daily events = [event 1], unfixed; overall 1 of 2
    assert (x[2][0], x[2][2]) == (0.5, 0.0)
    # Event 12: the last 10 earlier events (2..11) hold no fix; all 12 earlier hold one
    assert x[12][3] == 0.0
    assert x[12][0] == pytest.approx(1 / 12)


def test_undefined_ratios_take_the_training_mean() -> None:
    x = np.array([[np.nan, 1.0, np.nan, 0, 0] + [0.0] * 10, [0.5, 0.0, 0.2, 0, 0] + [1.0] * 10])
    fitted = forecast_model.fit(x, np.array([0, 1]), ForecastSpec())
    assert fitted.means[:3].tolist() == [0.5, 0.5, 0.2]


def test_model_skips_without_rows_or_with_one_class() -> None:
    empty = forecast_model.Rows(
        x=np.zeros((0, 15)),
        y=np.zeros(0, np.int64),
        forecast_codes=np.zeros(0, np.int64),
        forecast_x=np.zeros((0, 15)),
    )
    assert forecast_model.train(empty, 0, ForecastSpec()).report.skipped_reason == "no_rows"
    one = compute(request(historical=[hist(0, 3), hist(1, 3), hist(2, 4)]), FORECAST)
    assert (one.model.trained, one.model.skipped_reason) == (False, "one_class")
    assert one.scores[0].fix_probability == 0.0


def test_without_a_model_to_train_no_model_rows_are_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a payload whose events all have the same label, and one whose events have both
    one_class = request(historical=[hist(0, 3), hist(1, 3), hist(2, 4)])
    both = request(historical=[hist(0, 3), hist(1, 3), hist(2, 1), hist(3, 1)])
    built: list[int] = []
    real_rows = forecast_model.rows

    def counting_rows(ev: pair_events.PairEvents, *args: object) -> forecast_model.Rows:
        built.append(len(ev))
        return real_rows(ev, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(forecast_model, "rows", counting_rows)
    # When both are computed
    skipped = compute(one_class, FORECAST)
    trained = compute(both, FORECAST)
    # Then only the second built the model's rows; the first still reports its events as rows
    assert built == [3]
    assert (skipped.model.skipped_reason, skipped.model.training_rows) == ("one_class", 2)
    assert trained.model.trained


# --- weights -----------------------------------------------------------------------------


def test_worked_example_under_forecast_scoring() -> None:
    result = compute(parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes()), FORECAST)
    [score] = result.scores
    # Events: 10→8 (0.2), 8→8 (0), 8→4 (0.5) historical; 5→7 (0), 7→3 (0.5714) daily.
    # One shortcode, so e = μ = 1.2714 / 5 = 0.25428; weight round(100·(1 − 0.74572^10)) = 95
    assert (score.fix_rate, score.events, score.issue_weight) == (0.2543, 5, 95)
    # The seed's rates are still reported
    assert (score.daily_weighted_fix_rate, score.historical_weighted_fix_rate) == (0.5714, 0.4)
    assert result.scoring == "forecast"
    model = result.model
    assert (model.trained, model.estimator, model.training_rows) == (True, "LogisticRegression", 5)
    # The newest 20 % (one row) holds one class: no held-out figures
    assert (model.roc_auc, model.precision) == (None, None)
    assert (model.half_life_days, model.blend_weight, model.backtest_spearman) == (None, 0.0, None)


def test_blend_weight_mixes_in_the_model() -> None:
    req = parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes())
    plain = compute(req, FORECAST).scores[0]
    only_model = compute(req, PipelineConfig(model_weight=1.0)).scores[0]
    assert only_model.issue_weight == forecast.forecast_weight(plain.fix_probability)


def test_a_repository_without_any_fix_falls_back_to_severity() -> None:
    # Given counts that never drop: every event has r = 0
    req = request(
        historical=[hist(0, 1, shortcode="CRIT", severity="critical"), hist(1, 2, shortcode="CRIT",
                    severity="critical"), hist(0, 4, shortcode="MIN", severity="minor"),
                    hist(1, 4, shortcode="MIN", severity="minor")]
    )  # fmt: skip
    scores = compute(req, FORECAST).scores
    # Then the seed rule with no model decides: 0.2 · 0.82 → 16, 0.2 · 0.25 → 5
    assert [(s.issue_shortcode, s.issue_weight) for s in scores] == [("CRIT", 16), ("MIN", 5)]
    assert [s.fix_rate for s in scores] == [0.0, 0.0]


def test_a_shortcode_without_events_gets_its_group_prior() -> None:
    req = request(
        historical=[hist(0, 4, shortcode="A"), hist(1, 2, shortcode="A"), hist(0, 3, shortcode="B")]
    )
    by_code = {s.issue_shortcode: s for s in compute(req, FORECAST).scores}
    # A: one event r = 0.5; B (same severity) has none: e_B = μ = 0.5
    assert (by_code["B"].events, by_code["B"].fix_rate, by_code["B"].fix_probability) == (0, 0.5, 0)
    assert by_code["A"].fix_rate == 0.5


@pytest.mark.parametrize(("p", "weight"), [(0.0, 0), (0.05, 40), (0.2543, 95), (0.5, 100)])
def test_forecast_weight_spreads_the_scale(p: float, weight: int) -> None:
    assert forecast.forecast_weight(p) == weight


@given(st.floats(0, 1), st.floats(0, 1))
def test_forecast_weight_is_monotone_and_in_range(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert 0 <= forecast.forecast_weight(lo) <= forecast.forecast_weight(hi) <= 100


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), min_size=2, max_size=60))
def test_weights_are_monotone_in_the_fix_rate_when_the_model_is_not_blended(
    rows: list[tuple[int, int]],
) -> None:
    req = request(historical=[hist(i, f, shortcode=f"S{c}") for i, (c, f) in enumerate(rows)])
    scores = compute(req, NO_RECENCY).scores
    if not any((s.fix_rate or 0) > 0 for s in scores):
        return  # no fix at all: the severity fallback, covered above
    for a in scores:
        for b in scores:
            if (a.fix_rate or 0) < (b.fix_rate or 0):
                assert a.issue_weight <= b.issue_weight


def _body(payload: object) -> bytes:
    return orjson.dumps(payload)


def test_fixed_half_life_is_reported() -> None:
    req = parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes())
    result = compute(req, PipelineConfig(recency=30.0))
    assert (result.model.half_life_days, result.model.backtest_spearman) == (30.0, None)
    # Ages from the last timestamp (02-10): a_i = 0.5^(age / 30) changes e
    assert result.scores[0].fix_rate != 0.2543


def test_a_result_survives_the_stores_sorted_json_byte_for_byte() -> None:
    # The store keeps results as JSON with sorted keys; a re-published copy must be identical.
    computed = compute(
        parse_request((ROOT_EXAMPLES / "worked-example.json").read_bytes()), FORECAST
    )
    result = TrainingResult(
        **computed.model_dump(), request_id="r", deployflag_version="1",
        finished_at=datetime(2021, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    stored = json.loads(json.dumps(result.model_dump(mode="json"), sort_keys=True))
    again = TrainingResult.model_validate(stored)
    assert encode_json_reply(again).body == encode_json_reply(result).body
