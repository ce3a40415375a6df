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
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from deployflag.messages import ModelReport
from deployflag.pipeline.config import ForecastSpec
from deployflag.pipeline.events import DAY_US, F64, I64, Bool, group_starts, group_stops, shifted
from deployflag.pipeline.model import NO_ROWS, ONE_CLASS, one_class, split
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
    first = np.repeat(starts, group_stops(starts, n) - starts)
    k = (idx - first).astype(np.float64)
    y = (fix_rate > 0).astype(np.float64)

    # Running sums of the counted quantities, one column each, over all events (one cumsum:
    # on small requests numpy's per-call cost outweighs the arithmetic). Column order: fixed,
    # fix rate, historical, fixed historical, daily, fixed daily.
    counted = np.empty((n, 6))
    counted[:, 0], counted[:, 1] = y, fix_rate
    counted[:, 2], counted[:, 4] = ~daily, daily
    counted[:, 3], counted[:, 5] = y * ~daily, y * daily
    sums = np.zeros((n + 1, 6))
    np.cumsum(counted, axis=0, out=sums[1:])
    earlier = sums[idx] - sums[first]  # over the shortcode's earlier events
    cy = sums[:, 0]
    same = np.where(daily, earlier[:, 5], earlier[:, 3])  # ... of the same source
    same_n = np.where(daily, earlier[:, 4], earlier[:, 2])

    last = np.minimum(idx - first, LAST_N)

    # First earlier event at most WINDOW_DAYS old: a search on (code, time rank), both exact.
    distinct = np.unique(time)
    rank = np.searchsorted(distinct, time)
    floor = np.searchsorted(distinct, time - WINDOW_DAYS * DAY_US, side="left")
    key = code * (len(distinct) + 1) + rank
    lo = np.searchsorted(key, code * (len(distinct) + 1) + floor, side="left")

    has_prev = idx > first
    prev = np.maximum(idx - 1, 0)
    prev2 = np.maximum(idx - 2, 0)
    days_prev = np.where(has_prev, (time - time[prev]) // DAY_US, 0)
    days_first = (time - time[first]) // DAY_US

    # The latest earlier event with a fix, as the seed's days_after_last_fixed: Short or Long.
    fixed_at = np.maximum.accumulate(np.where(fix_rate > 0, idx, -1)) if n else idx
    earlier_fix = shifted(fixed_at, -1)
    seen_fix = earlier_fix >= first
    gap = (time - time[np.maximum(earlier_fix, 0)]) // DAY_US
    long_gap = seen_fix & (gap >= long_gap_days)

    out = np.empty((n, len(INPUTS)))
    # The ratios (NaN where there is nothing to count), numerators beside their denominators.
    out[:, :UNDEFINED_WHEN_EMPTY] = np.nan
    num = np.column_stack(
        [earlier[:, 0], earlier[:, 1], same, cy[idx] - cy[idx - last], cy[idx] - cy[lo]]
    )
    den = np.column_stack([k, k, same_n, last, idx - lo]).astype(np.float64)
    np.divide(num, den, out=out[:, :UNDEFINED_WHEN_EMPTY], where=den > 0)
    out[:, 5] = np.where(has_prev, fix_rate[prev], 0.0)
    out[:, 6] = np.where(idx - first >= 2, fix_rate[prev2], 0.0)
    out[:, 7] = daily
    out[:, 8] = severity[code]
    out[:, 9] = np.log1p(k)
    out[:, 10] = np.log1p(days_prev.astype(np.float64))
    out[:, 11] = np.log1p(days_first.astype(np.float64))
    out[:, 12] = np.log1p(frequency.astype(np.float64))
    out[:, 13] = seen_fix & ~long_gap
    out[:, 14] = long_gap
    return out


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
    ends = group_stops(starts, n)  # where the virtual events go
    codes = events.code[starts]
    last_event_freq = events.frequency[ends - 1]
    virtual_freq = np.where(last_historical[codes] > 0, last_historical[codes], last_event_freq)
    # One virtual historical event per shortcode at t_end, after all of its events: the
    # shortcode's g-th one lands at ends[g] + g (what np.insert(a, ends, v) does, cheaper).
    virtual = np.zeros(n + len(ends), dtype=np.bool_)
    virtual[ends + np.arange(len(ends))] = True
    real = ~virtual

    def merged(a: NDArray[np.generic], extra: NDArray[np.generic] | float | bool) -> NDArray[Any]:
        out = np.empty(len(virtual), dtype=a.dtype)
        out[real] = a
        out[virtual] = extra
        return out

    code = merged(events.code, codes)
    stamp = merged(events.time, t_end)
    freq = merged(events.frequency, virtual_freq)
    rate = merged(events.fix_rate, 0.0)
    daily = merged(events.daily, False)
    x_all = inputs(code, stamp, freq, rate, daily, severity, long_gap_days)

    x, y = x_all[real], events.label
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
    if one_class(train_y) or one_class(test_y):
        return None, None
    p = fit(x[:cut], train_y, spec).probabilities(x[cut:])
    auc = float(roc_auc_score(test_y, p))
    precision = float(precision_score(test_y, (p >= 0.5).astype(np.int64), zero_division=0.0))
    return round(auc, 4), round(precision, 4)


@dataclass(frozen=True, slots=True)
class Forecast:
    report: ModelReport
    probability: F64  # per shortcode code; 0 without events or without a model


def skipped_reason(labels: I64) -> str | None:
    """Why no model is trained on events with these labels (None: one is)."""
    return NO_ROWS if len(labels) == 0 else ONE_CLASS if one_class(labels) else None


def untrained(reason: str, training_rows: int, n_codes: int, spec: ForecastSpec,
              started: float) -> Forecast:  # fmt: skip
    report = ModelReport(
        trained=False,
        skipped_reason=reason,
        training_seconds=round(clock.perf_counter() - started, 4),
        estimator=spec.estimator,
        training_rows=training_rows,
    )
    return Forecast(report=report, probability=np.zeros(n_codes, dtype=np.float64))


def train(data: Rows, n_codes: int, spec: ForecastSpec) -> Forecast:
    started = clock.perf_counter()
    reason = skipped_reason(data.y)
    if reason is not None:
        return untrained(reason, len(data.y), n_codes, spec, started)
    probability = np.zeros(n_codes, dtype=np.float64)
    auc, precision = evaluate(data.x, data.y, spec)
    fitted = fit(data.x, data.y, spec)
    probability[data.forecast_codes] = fitted.probabilities(data.forecast_x)
    report = ModelReport(
        trained=True,
        parameters=spec.parameters,
        roc_auc=auc,
        precision=precision,
        training_seconds=round(clock.perf_counter() - started, 4),
        estimator=spec.estimator,
        training_rows=len(data.y),
    )
    return Forecast(report=report, probability=probability)
