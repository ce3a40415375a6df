"""Forecast scoring's model: will the next event of a shortcode be a fix?

Every input of an event's row is computed from the shortcode's *earlier* events only (k of
them), so the model forecasts; it never sees the label it predicts. The forecast row of a
shortcode describes "a historical event now": the same inputs over all its events, at the
payload's latest timestamp. A standardised logistic regression is evaluated on the newest 20 %
of the rows in time order, then refitted on all. See docs/scoring.md.
"""

from __future__ import annotations

import time as clock
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from deployflag.messages import ModelReport
from deployflag.pipeline.config import ForecastSpec
from deployflag.pipeline.events import DAY_US, F64, I64, Bool, group_starts
from deployflag.pipeline.model import NO_ROWS, ONE_CLASS, split
from deployflag.pipeline.pair_events import PairEvents

WINDOW_DAYS = 30  # "recent" share: earlier events at most this many days old
LAST_N = 10  # "latest" share: over the last this many earlier events

INPUTS = (
    "share_fixed",  # earlier events with y = 1, as a share      (undefined without any)
    "mean_fix_rate",  # mean earlier r                            (undefined without any)
    "share_fixed_same_source",  # ... over earlier events of the same source (undefined: none)
    "share_fixed_last_10",  # ... over the last min(k, 10)          (undefined without any)
    "share_fixed_30_days",  # ... over earlier events of the last 30 days (undefined: none)
    "previous_fix_rate",
    "previous_2_fix_rate",
    "daily",
    "severity_score",
    "log1p_earlier_events",
    "log1p_days_since_previous",
    "log1p_days_since_first",
    "log1p_frequency",
    "last_fixed_short",
    "last_fixed_long",
)
UNDEFINED_WHEN_EMPTY = 5  # the first five are ratios; they take the training mean when undefined


def _ratio(num: F64, den: F64) -> F64:
    out = np.full(len(num), np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def _exclusive_cumsum(x: NDArray[np.generic]) -> F64:
    """C[j] = x[0] + … + x[j-1]; one entry longer than x."""
    out: F64 = np.r_[0.0, np.cumsum(x, dtype=np.float64)]
    return out


def inputs(
    code: I64,
    time: I64,
    frequency: I64,
    fix_rate: F64,
    daily: Bool,
    severity: I64,
    long_gap_days: int,
) -> F64:
    """The INPUTS of every event, from the earlier events of its shortcode (NaN: undefined).

    Rows must be grouped by code with time non-decreasing inside each group.
    """
    n = len(code)
    idx = np.arange(n)
    starts = group_starts(code)
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    k = (idx - first).astype(np.float64)
    y = (fix_rate > 0).astype(np.float64)

    cy, cr = _exclusive_cumsum(y), _exclusive_cumsum(fix_rate)
    earlier_y = cy[idx] - cy[first]
    earlier_r = cr[idx] - cr[first]

    same = np.empty(n)
    same_n = np.empty(n)
    for source in (False, True):
        mask = daily == source
        cn, cys = _exclusive_cumsum(mask), _exclusive_cumsum(y * mask)
        same = np.where(mask, cys[idx] - cys[first], same)
        same_n = np.where(mask, cn[idx] - cn[first], same_n)

    last = np.minimum(idx - first, LAST_N)
    last_y = cy[idx] - cy[idx - last]

    # First earlier event at most WINDOW_DAYS old: a search on (code, time rank), both exact.
    distinct = np.unique(time)
    rank = np.searchsorted(distinct, time)
    floor = np.searchsorted(distinct, time - WINDOW_DAYS * DAY_US, side="left")
    key = code * (len(distinct) + 1) + rank
    lo = np.searchsorted(key, code * (len(distinct) + 1) + floor, side="left")
    window_n = (idx - lo).astype(np.float64)
    window_y = cy[idx] - cy[lo]

    has_prev = idx > first
    prev = np.maximum(idx - 1, 0)
    prev2 = np.maximum(idx - 2, 0)
    days_prev = np.where(has_prev, (time - time[prev]) // DAY_US, 0)
    days_first = (time - time[first]) // DAY_US

    # The latest earlier event with a fix, as the seed's days_after_last_fixed: Short or Long.
    fixed_at = np.maximum.accumulate(np.where(fix_rate > 0, idx, -1)) if n else idx
    earlier_fix = np.r_[-1, fixed_at[:-1]][:n]
    seen_fix = earlier_fix >= first
    gap = (time - time[np.maximum(earlier_fix, 0)]) // DAY_US
    long_gap = seen_fix & (gap >= long_gap_days)

    return np.column_stack(
        [
            _ratio(earlier_y, k),
            _ratio(earlier_r, k),
            _ratio(same, same_n),
            _ratio(last_y, last.astype(np.float64)),
            _ratio(window_y, window_n),
            np.where(has_prev, fix_rate[prev], 0.0),
            np.where(idx - first >= 2, fix_rate[prev2], 0.0),
            daily.astype(np.float64),
            severity[code].astype(np.float64),
            np.log1p(k),
            np.log1p(days_prev.astype(np.float64)),
            np.log1p(days_first.astype(np.float64)),
            np.log1p(frequency.astype(np.float64)),
            (seen_fix & ~long_gap).astype(np.float64),
            long_gap.astype(np.float64),
        ]
    )


@dataclass(frozen=True, slots=True)
class Rows:
    """Training rows (one per event, in evaluation order) and one forecast row per shortcode
    that has events."""

    x: F64
    y: I64
    forecast_codes: I64
    forecast_x: F64


def rows(
    events: PairEvents,
    severity: I64,
    t_end: int,
    last_historical: I64,
    long_gap_days: int,
) -> Rows:
    """``last_historical`` is each shortcode's latest default-branch count (0 without one)."""
    n = len(events)
    starts = group_starts(events.code)
    ends = np.r_[starts[1:], n][: len(starts)].astype(np.intp)  # where the virtual events go
    codes = events.code[starts]
    last_event_freq = events.frequency[ends - 1] if n else events.frequency
    virtual_freq = np.where(last_historical[codes] > 0, last_historical[codes], last_event_freq)
    # One virtual historical event per shortcode at t_end, after all of its events.
    code = np.insert(events.code, ends, codes)
    stamp = np.insert(events.time, ends, t_end)
    freq = np.insert(events.frequency, ends, virtual_freq)
    rate = np.insert(events.fix_rate, ends, 0.0)
    daily = np.insert(events.daily, ends, False)
    x_all = inputs(code, stamp, freq, rate, daily, severity, long_gap_days)
    virtual = np.zeros(len(code), dtype=np.bool_)
    virtual[ends + np.arange(len(ends))] = True

    x, y = x_all[~virtual], events.label
    # Evaluation order: (timestamp, shortcode, historical before daily, event order).
    order = np.lexsort((np.arange(n), events.daily, events.code, events.time))
    return Rows(x=x[order], y=y[order], forecast_codes=codes, forecast_x=x_all[virtual])


@dataclass(frozen=True, slots=True)
class Fitted:
    means: F64  # training means of the ratio columns, for undefined values
    scaler: StandardScaler
    model: LogisticRegression

    def probabilities(self, x: F64) -> F64:
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        p = self.model.predict_proba(self.scaler.transform(_impute(x, self.means)))
        return np.asarray(p[:, 1], dtype=np.float64)


def _impute(x: F64, means: F64) -> F64:
    out = x.copy()
    ratio = out[:, :UNDEFINED_WHEN_EMPTY]
    missing = np.isnan(ratio)
    ratio[missing] = np.broadcast_to(means, ratio.shape)[missing]
    return out


def fit(x: F64, y: I64, spec: ForecastSpec) -> Fitted:
    ratio = x[:, :UNDEFINED_WHEN_EMPTY]
    defined = ~np.isnan(ratio)
    count = defined.sum(axis=0)
    total = np.where(defined, ratio, 0.0).sum(axis=0)
    means = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    filled = _impute(x, means)
    scaler = StandardScaler().fit(filled)
    model = LogisticRegression(C=spec.C, solver=spec.solver, max_iter=spec.max_iter)
    with warnings.catch_warnings():
        # Not converging in max_iter steps still gives a usable model; it is not an error.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scaler.transform(filled), y)
    return Fitted(means=means, scaler=scaler, model=model)


def evaluate(x: F64, y: I64, spec: ForecastSpec) -> tuple[float | None, float | None]:
    """ROC AUC and precision (threshold 0.5) on the newest 20 % after fitting on the rest;
    None where a part lacks a class."""
    cut = split(len(y))
    train_y, test_y = y[:cut], y[cut:]
    if np.unique(train_y).size < 2 or np.unique(test_y).size < 2:
        return None, None
    p = fit(x[:cut], train_y, spec).probabilities(x[cut:])
    auc = float(roc_auc_score(test_y, p))
    precision = float(precision_score(test_y, (p >= 0.5).astype(np.int64), zero_division=0.0))
    return round(auc, 4), round(precision, 4)


@dataclass(frozen=True, slots=True)
class Forecast:
    report: ModelReport
    probability: F64  # per shortcode code; 0 without events or without a model


def train(data: Rows, n_codes: int, spec: ForecastSpec) -> Forecast:
    started = clock.perf_counter()
    probability = np.zeros(n_codes, dtype=np.float64)
    reason = NO_ROWS if len(data.y) == 0 else ONE_CLASS if np.unique(data.y).size < 2 else None
    base = {"estimator": spec.estimator, "training_rows": len(data.y)}
    if reason is not None:
        report = ModelReport(
            trained=False,
            skipped_reason=reason,
            training_seconds=round(clock.perf_counter() - started, 4),
            **base,
        )
        return Forecast(report=report, probability=probability)
    auc, precision = evaluate(data.x, data.y, spec)
    fitted = fit(data.x, data.y, spec)
    probability[data.forecast_codes] = fitted.probabilities(data.forecast_x)
    report = ModelReport(
        trained=True,
        parameters=spec.parameters,
        roc_auc=auc,
        precision=precision,
        training_seconds=round(clock.perf_counter() - started, 4),
        **base,
    )
    return Forecast(report=report, probability=probability)
