"""Seed scoring's issue weights: a fixed blend of two weighted fix rates, the model's
fix probability and the severity (docs/scoring.md)."""

from __future__ import annotations

import numpy as np

from deployflag.messages import Score
from deployflag.pipeline.config import Weights
from deployflag.pipeline.events import F64, I64, Bool, shifted
from deployflag.pipeline.features import Features, Shortcodes
from deployflag.pipeline.model import Trained


def weighted_fix_rates(code: I64, fix_rate: F64, mask: Bool, n_codes: int) -> list[float]:
    """Per shortcode, ``round4`` of the mean of its masked fix rates with weights 1, 2, …, n in
    row order (rows are grouped by code and time-sorted); 0 when it has none.

    ``np.bincount`` adds its weights in index order, so each sum is the plain left-to-right sum.
    """
    c, r = code[mask], fix_rate[mask]
    counts = np.bincount(c, minlength=n_codes)
    # Weight of a row = its 1-based rank inside its shortcode.
    first = shifted(np.cumsum(counts), 0)
    weight = np.arange(1, len(c) + 1) - first[c]
    sums = np.bincount(c, weights=weight * r, minlength=n_codes)
    return [
        round(s / (n * (n + 1) // 2), 4) if n else 0.0
        for s, n in zip(sums.tolist(), counts.tolist(), strict=True)
    ]


def fix_probabilities(features: Features, trained: Trained, n_codes: int) -> F64:
    """Per shortcode, the model's class-1 probability of its latest feature row; 0 for a
    shortcode without events or a request without a model."""
    out = np.zeros(n_codes, dtype=np.float64)
    codes, latest = features.latest()
    if len(latest):
        out[codes] = trained.probabilities(features.matrix()[latest])
    return out


def issue_weight(score: float) -> int:
    return int(min(100, round(score * 100)))


def scores(
    features: Features, info: Shortcodes, probabilities: F64, weights: Weights
) -> list[Score]:
    """One Score per shortcode, by issue_weight descending, then shortcode.

    ``probabilities`` holds each shortcode's fix probability (0 without a model or an event).
    """
    n = len(info.names)
    daily = weighted_fix_rates(features.code, features.fix_rate, features.daily, n)
    hist = weighted_fix_rates(features.code, features.fix_rate, ~features.daily, n)
    counts = np.bincount(features.code, minlength=n).tolist()
    out = []
    for name, d, h, p, sev, k in zip(
        info.names, daily, hist, probabilities.tolist(), info.severity.tolist(), counts,
        strict=True,
    ):  # fmt: skip
        score = weights.w1 * d + weights.w2 * h + weights.w3 * p + weights.w4 * (sev / 100)
        out.append(
            Score(
                issue_shortcode=name,
                issue_weight=issue_weight(score),
                fix_probability=round(p, 4),
                daily_weighted_fix_rate=d,
                historical_weighted_fix_rate=h,
                severity_score=sev,
                events=k,
            )
        )
    out.sort(key=lambda s: (-s.issue_weight, s.issue_shortcode))
    return out
