"""Seed scoring's feature rows, and each shortcode's issue type and severity (both scorings;
docs/scoring.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from deployflag.messages import AnalysisRun, HistoricalRun, TrainingRequest
from deployflag.pipeline.events import (
    DAY_US,
    F64,
    I64,
    Bool,
    Columns,
    Events,
    group_starts,
    group_stops,
    shifted,
)

TYPE_CATEGORIES = (
    "antipattern",
    "bug-risk",
    "performance",
    "security",
    "style",
    "doc",
    "typecheck",
    "coverage",
    "other",
)
_TYPE_BY_LETTERS = {
    "antipattern": "antipattern",
    "bugrisk": "bug-risk",
    "performance": "performance",
    "security": "security",
    "style": "style",
    "doc": "doc",
    "documentation": "doc",
    "typecheck": "typecheck",
    "coverage": "coverage",
}
_SEVERITY_SCORES = {"critical": 82, "major": 60, "minor": 25}

LAST_FIXED = ("Never", "Short", "Long")  # days_after_last_fixed, by code
QUANTILES = ("low", "medium_low", "medium_high", "high")  # freq_detected_quantile, by code

# Model inputs, in column order; the last four are categorical (small non-negative ints).
FEATURE_NAMES = (
    "frequency_detected",
    "severity_score",
    "days_after_first_seen",
    "days_after_last_seen",
    "last_fix_rate",
    "last_2_fix_rate",
    "month",
    "quarter",
    "type",
    "issue_id",
    "days_after_last_fixed",
    "freq_detected_quantile",
)
CATEGORICAL = np.array([False] * 8 + [True] * 4)
MAX_CATEGORIES = 255  # HistGradientBoosting's limit on a categorical feature's cardinality


def type_category(issue_type: str | None) -> str:
    """Letters only, lower-cased, then the type mapping (so `Bug Risk` is `bug-risk`)."""
    letters = "".join(ch for ch in (issue_type or "").lower() if ch.isalpha())
    return _TYPE_BY_LETTERS.get(letters, "other")


def severity_score(severity: str | None) -> int:
    return _SEVERITY_SCORES.get((severity or "").lower(), 0)


@dataclass(frozen=True, slots=True)
class Shortcodes:
    """Per shortcode code: its name, severity score and type (an index into TYPE_CATEGORIES)."""

    names: tuple[str, ...]
    severity: I64
    type: I64


def shortcode_info(request: TrainingRequest, cols: Columns) -> Shortcodes:
    """Type and severity from a shortcode's first analysis_run row, else its first historical."""
    n = len(cols.shortcodes)
    first: list[tuple[str | None, str | None]] = [(None, None)] * n
    # Historical first, so that analysis rows overwrite: the analysis row wins when both exist.
    rows: list[AnalysisRun] | list[HistoricalRun]
    for rows, codes in (
        (request.historical_run, cols.hist_code),
        (request.analysis_run, cols.daily_code),
    ):
        if len(codes):
            found, index = np.unique(codes, return_index=True)
            for c, i in zip(found.tolist(), index.tolist(), strict=True):
                first[c] = (rows[i]["issue_type"], rows[i]["severity"])
    return Shortcodes(
        names=cols.shortcodes,
        severity=np.asarray([severity_score(s) for _, s in first], dtype=np.int64),
        type=np.asarray([TYPE_CATEGORIES.index(type_category(t)) for t, _ in first], np.int64),
    )


@dataclass(frozen=True, slots=True)
class Features:
    """One row per event, grouped by shortcode code and stably sorted by time inside it."""

    code: I64
    time: I64
    event: I64  # index into Events: the event order
    daily: Bool
    fix_rate: F64
    frequency_detected: I64
    severity_score: I64
    type: I64
    days_after_first_seen: I64
    days_after_last_seen: I64
    last_fix_rate: F64
    last_2_fix_rate: F64
    days_after_last_fixed: I64  # index into LAST_FIXED
    freq_detected_quantile: I64  # index into QUANTILES
    month: I64
    quarter: I64
    label: I64

    def __len__(self) -> int:
        return len(self.code)

    def latest(self) -> tuple[I64, NDArray[np.intp]]:
        """(shortcode codes that have events, index of each one's latest row)."""
        starts = group_starts(self.code)
        return self.code[starts], group_stops(starts, len(self.code)) - 1

    def matrix(self) -> F64:
        """The model's input: FEATURE_NAMES columns as float64; CATEGORICAL marks categories."""
        return np.column_stack(
            [
                self.frequency_detected,
                self.severity_score,
                self.days_after_first_seen,
                self.days_after_last_seen,
                self.last_fix_rate,
                self.last_2_fix_rate,
                self.month,
                self.quarter,
                self.type,
                issue_categories(self.code),
                self.days_after_last_fixed,
                self.freq_detected_quantile,
            ]
        ).astype(np.float64)


def issue_categories(code: I64, limit: int = MAX_CATEGORIES) -> I64:
    """Shortcode codes as a categorical feature of at most ``limit`` values: beyond that, the
    ``limit - 1`` most frequent shortcodes keep their own category and the rest share one."""
    found, counts = np.unique(code, return_counts=True)
    if len(found) <= limit:
        return code
    keep = found[np.argsort(-counts, kind="stable")[: limit - 1]]
    return np.where(np.isin(code, keep), code, int(found.max()) + 1)


def _quantile_bins(values: I64, starts: NDArray[np.intp]) -> I64:
    """freq_detected_quantile per row, with numpy's default quantiles per shortcode.

    Shortcodes with the same number of events are stacked and done in one np.quantile call, so
    the work is one call per distinct group size, not per shortcode.
    """
    sizes = group_stops(starts, len(values)) - starts
    out = np.zeros(len(values), dtype=np.int64)
    for size in np.unique(sizes).tolist():
        idx = starts[sizes == size][:, None] + np.arange(size)
        block = values[idx]
        q25, q50, q75 = np.quantile(block, [0.25, 0.5, 0.75], axis=1)[:, :, None]
        out[idx] = (block >= q25).astype(np.int64) + (block >= q50) + (block >= q75)
    return out


def build(events: Events, info: Shortcodes, long_gap_days: int) -> Features:
    o = np.lexsort((np.arange(len(events)), events.time, events.code))  # stable by construction
    code, t, rate = events.code[o], events.time[o], events.fix_rate[o]
    n = len(code)
    idx = np.arange(n)
    starts = group_starts(code)
    first = np.repeat(starts, group_stops(starts, n) - starts)  # each row's group start
    rank = idx - first

    prev = np.maximum(idx - 1, 0)
    prev2 = np.maximum(idx - 2, 0)
    days_since_prev = np.where(rank >= 1, (t - t[prev]) // DAY_US, 0)
    last = np.where(rank >= 1, rate[prev], 0.0)
    last2 = np.where(rank >= 2, rate[prev2], 0.0)

    # Latest earlier row (of any shortcode) with a fix; it counts only inside the same shortcode.
    fixed_at = np.maximum.accumulate(np.where(rate > 0, idx, -1)) if n else idx
    earlier = shifted(fixed_at, -1)
    seen_fix = earlier >= first
    gap = (t - t[np.maximum(earlier, 0)]) // DAY_US
    last_fixed = np.where(seen_fix, np.where(gap >= long_gap_days, 2, 1), 0)

    month = t.astype("datetime64[us]").astype("datetime64[M]").astype(np.int64) % 12 + 1
    return Features(
        code=code,
        time=t,
        event=o.astype(np.int64),
        daily=events.daily[o],
        fix_rate=rate,
        frequency_detected=events.frequency_detected[o],
        severity_score=info.severity[code],
        type=info.type[code],
        days_after_first_seen=(t - t[first]) // DAY_US,
        days_after_last_seen=days_since_prev,
        last_fix_rate=last,
        last_2_fix_rate=last2,
        days_after_last_fixed=last_fixed.astype(np.int64),
        freq_detected_quantile=_quantile_bins(events.frequency_detected[o], starts),
        month=month,
        quarter=(month - 1) // 3 + 1,
        label=(rate > 0).astype(np.int64),
    )
