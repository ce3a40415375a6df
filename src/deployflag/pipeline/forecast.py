"""Forecast scoring (the default): pair events, a smoothed fix rate with optional recency, a
forecasting model, and a weight that ranks shortcodes by how likely the team is to fix them.

    p_c = w · fix_probability + (1 − w) · e_c,   issue_weight = round(100 · (1 − (1 − p_c)^10))

The exponent only spreads the scale; the ranking follows p_c. A repository without a single fix
has nothing to rank by, so its weights fall back to the seed rule with no model (severity
decides). The seed's daily and historical rates are still reported, for continuity.
See docs/scoring.md.
"""

from __future__ import annotations

import time

import numpy as np

from deployflag.messages import Computation, Score, TrainingRequest
from deployflag.pipeline import events, fix_rate, forecast_model, pair_events, scoring
from deployflag.pipeline.config import PipelineConfig
from deployflag.pipeline.events import F64, I64, Columns, stable_order
from deployflag.pipeline.features import Shortcodes

SPREAD = 10  # the exponent of issue_weight


def forecast_weight(p: float) -> int:
    return int(min(100, round(100 * (1 - (1 - p) ** SPREAD))))


def time_span(cols: Columns) -> tuple[int, int]:
    """The payload's earliest and latest timestamps (0, 0 for an empty payload)."""
    stamps = np.concatenate([cols.hist_time, cols.daily_time])
    return (int(stamps.min()), int(stamps.max())) if len(stamps) else (0, 0)


def last_historical(cols: Columns, n_codes: int) -> I64:
    """Each shortcode's latest default-branch count (0 without one)."""
    out = np.zeros(n_codes, dtype=np.int64)
    o = stable_order(cols.hist_code, cols.hist_time)
    out[cols.hist_code[o]] = cols.hist_freq[o]  # later rows overwrite earlier ones
    return out


def seed_rates(
    cols: Columns, n_codes: int, seg: events.Segments | None = None
) -> tuple[list[float], list[float]]:
    """The seed scoring's daily and historical weighted fix rates, reported for continuity."""
    ev = events.build(cols, seg)
    o = np.lexsort((np.arange(len(ev)), ev.time, ev.code))
    code, rate, daily = ev.code[o], ev.fix_rate[o], ev.daily[o]
    return (
        scoring.weighted_fix_rates(code, rate, daily, n_codes),
        scoring.weighted_fix_rates(code, rate, ~daily, n_codes),
    )


def half_life_of(config: PipelineConfig, ev: pair_events.PairEvents, info: Shortcodes,
                 span: tuple[int, int]) -> fix_rate.Recency:  # fmt: skip
    if config.recency == "none":
        return fix_rate.Recency(half_life=None, spearman=None)
    if config.recency == "auto":
        return fix_rate.choose(
            ev.code, ev.time, ev.fix_rate, info.severity, *span, config.prior_strength
        )
    return fix_rate.Recency(half_life=float(config.recency), spearman=None)


def compute(request: TrainingRequest, cols: Columns, info: Shortcodes,
            config: PipelineConfig) -> Computation:  # fmt: skip
    seg = events.daily_segments(cols)  # the seed's rates, reported too, use the same ones
    ev = pair_events.build(cols, seg)
    span = time_span(cols)
    recency = half_life_of(config, ev, info, span)
    weight = fix_rate.recency_weights(ev.time, span[1], recency.half_life)
    e = fix_rate.smoothed(ev.code, ev.fix_rate, weight, info.severity, config.prior_strength)
    forecast = _forecast(cols, ev, info, span[1], config)
    report = forecast.report.model_copy(
        update={
            "half_life_days": recency.half_life,
            "blend_weight": config.model_weight,
            "backtest_spearman": recency.spearman,
        }
    )
    return Computation(
        repo_id=request.repo_id,
        scoring="forecast",
        scores=scores(cols, info, ev, e, forecast.probability, config, seg),
        model=report,
    )


def _forecast(cols: Columns, ev: pair_events.PairEvents, info: Shortcodes, t_end: int,
              config: PipelineConfig) -> forecast_model.Forecast:  # fmt: skip
    """The model's forecast; the inputs of its rows are only computed when one is trained."""
    n = len(info.names)
    reason = forecast_model.skipped_reason(ev.label)
    if reason is not None:
        return forecast_model.untrained(reason, len(ev), n, config.forecast, time.perf_counter())
    data = forecast_model.rows(ev, info.severity, t_end, last_historical(cols, n),
                               config.long_gap_days)  # fmt: skip
    return forecast_model.train(data, n, config.forecast)


def scores(cols: Columns, info: Shortcodes, ev: pair_events.PairEvents, e: F64,
           probability: F64, config: PipelineConfig,
           seg: events.Segments | None = None) -> list[Score]:  # fmt: skip
    n = len(info.names)
    daily, hist = seed_rates(cols, n, seg)
    counts = np.bincount(ev.code, minlength=n).tolist()
    no_fix = not bool((ev.fix_rate > 0).any())
    w, wt = config.model_weight, config.weights
    out = []
    for i, name in enumerate(info.names):
        p, sev = float(probability[i]), int(info.severity[i])
        if no_fix:  # nothing to rank by: the seed rule with no model, so severity decides
            weight = scoring.issue_weight(
                wt.w1 * daily[i] + wt.w2 * hist[i] + wt.w3 * 0.0 + wt.w4 * (sev / 100)
            )
        else:
            weight = forecast_weight(w * p + (1 - w) * float(e[i]))
        out.append(
            Score(
                issue_shortcode=name,
                issue_weight=weight,
                fix_probability=round(p, 4),
                daily_weighted_fix_rate=daily[i],
                historical_weighted_fix_rate=hist[i],
                severity_score=sev,
                fix_rate=round(float(e[i]), 4),
                events=counts[i],
            )
        )
    out.sort(key=lambda s: (-s.issue_weight, s.issue_shortcode))
    return out
