"""Forecast scoring's fix rate: each shortcode's mean fix rate, shrunk towards its severity
group's, with optional recency weights, and the backtest that decides whether to use them.

For shortcode c with event weights a_i (1 without recency) and fix rates r_i:

    n_c = Σ a_i,   S_c = Σ a_i·r_i,   μ_g = Σ_{c∈g} S_c / Σ_{c∈g} n_c,
    e_c = (S_c + m·μ_g) / (n_c + m)

A group without events takes the repository's ΣS/Σn (0 without any event); a
shortcode without events gets μ_g. With a half-life h, a_i = 0.5^(age_i / h), age in days before the
payload's latest timestamp. See docs/scoring.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata  # type: ignore[import-untyped]

from deployflag.pipeline.events import DAY_US, F64, I64

HALF_LIFE_CANDIDATE = 60.0  # days: the one alternative to "no recency" the backtest considers
BACKTEST_AT = (4, 5)  # the backtest's cut: the 80 % point of the payload's time span
MIN_LATER_EVENTS = 20  # a shortcode's observed ratio after the cut counts from this many events
MIN_SHORTCODES = 8  # ... and the backtest decides only with this many such shortcodes
MARGIN = 0.02  # the half-life must beat "none" by this much Spearman


def recency_weights(time: I64, t_end: int, half_life: float | None) -> F64:
    """0.5^(age / half_life) with age in (fractional) days before ``t_end``; 1 for None."""
    if half_life is None:
        return np.ones(len(time), dtype=np.float64)
    age_days = (t_end - time) / DAY_US
    return np.asarray(0.5 ** (age_days / half_life), dtype=np.float64)


def smoothed(code: I64, fix_rate: F64, weight: F64, severity: I64, prior_strength: float) -> F64:
    """e_c for every shortcode code ``0 … len(severity) - 1``."""
    n_codes = len(severity)
    n = np.bincount(code, weights=weight, minlength=n_codes)
    s = np.bincount(code, weights=weight * fix_rate, minlength=n_codes)
    total_n = float(n.sum())
    repo = float(s.sum()) / total_n if total_n > 0 else 0.0
    groups, group_of = np.unique(severity, return_inverse=True)
    group_n = np.bincount(group_of, weights=n, minlength=len(groups))
    group_s = np.bincount(group_of, weights=s, minlength=len(groups))
    mu = np.where(group_n > 0, group_s / np.where(group_n > 0, group_n, 1.0), repo)[group_of]
    return np.asarray((s + prior_strength * mu) / (n + prior_strength), dtype=np.float64)


def spearman(a: F64, b: F64) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None when a side is constant or
    there are fewer than two items."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


@dataclass(frozen=True, slots=True)
class Recency:
    """The half-life to use (None: none) and the backtest's Spearman of it (None: not run, or
    too little data for it)."""

    half_life: float | None
    spearman: float | None


def observed_after(code: I64, time: I64, label: I64, cut: int, n_codes: int) -> tuple[I64, F64]:
    """Per shortcode, the number of events after ``cut`` and their share labelled fixed."""
    later = time > cut
    count = np.bincount(code[later], minlength=n_codes)
    fixed = np.bincount(code[later], weights=label[later], minlength=n_codes)
    return count, fixed / np.maximum(count, 1)


def backtest_cut(t_start: int, t_end: int) -> int:
    return t_start + (t_end - t_start) * BACKTEST_AT[0] // BACKTEST_AT[1]


def choose(
    code: I64,
    time: I64,
    fix_rate: F64,
    severity: I64,
    t_start: int,
    t_end: int,
    prior_strength: float,
) -> Recency:
    """Pick the half-life for ``auto`` by a time backtest between none and 60 days.

    The rates as they stood at the cut (events up to it, ages from it) are compared with what
    happened after it; the half-life wins only by a clear margin on enough shortcodes, because
    on a small payload the backtest is noise.
    """
    cut = backtest_cut(t_start, t_end)
    label = (fix_rate > 0).astype(np.int64)
    count, ratio = observed_after(code, time, label, cut, len(severity))
    qualified = count >= MIN_LATER_EVENTS
    if int(qualified.sum()) < MIN_SHORTCODES:
        return Recency(half_life=None, spearman=None)
    before = time <= cut
    scores: dict[float | None, float | None] = {}
    for half_life in (None, HALF_LIFE_CANDIDATE):
        weight = recency_weights(time[before], cut, half_life)
        e = smoothed(code[before], fix_rate[before], weight, severity, prior_strength)
        scores[half_life] = spearman(e[qualified], ratio[qualified])
    plain, recent = scores[None], scores[HALF_LIFE_CANDIDATE]
    if plain is not None and recent is not None and recent - plain >= MARGIN:
        return Recency(half_life=HALF_LIFE_CANDIDATE, spearman=round(recent, 4))
    return Recency(half_life=None, spearman=None if plain is None else round(plain, 4))
