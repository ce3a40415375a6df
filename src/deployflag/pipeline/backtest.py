"""How well would each scoring have predicted what a repository's team did next?

The payload is cut at the 80 % point of its time span. Every candidate setting scores the
shortcodes from the rows up to the cut; what happened after it — each shortcode's share of
fixed events among its pair events after the cut — is the answer key. A candidate is judged by
the Spearman correlation of its weights with that share, and by how many of the later fixes
fall in its top-weighted third of shortcodes. See docs/scoring.md.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
from pydantic import BaseModel

from deployflag.messages import TrainingRequest
from deployflag.pipeline import compute, events, fix_rate, forecast, pair_events
from deployflag.pipeline.config import PipelineConfig, Recency

MIN_SHORTCODES = 3  # fewer shortcodes with later events than this: no verdict
CLEAR_MARGIN = 0.02  # a candidate must beat the defaults by this much Spearman to be advised
RECENCIES: tuple[Recency, ...] = ("none", 60.0, "auto")
BLENDS = (0.0, 0.2, 0.5)


class Candidate(BaseModel):
    scoring: str
    recency: str | None  # None under seed scoring
    model_weight: float | None
    spearman: float | None  # None: constant weights or answers, or too few shortcodes
    top_third_share: float | None  # share of the later fixes; None without later fixes
    roc_auc: float | None  # the model's own held-out AUC, on the rows before the cut
    half_life_days: float | None  # the half-life the candidate used (auto: its choice)

    @property
    def is_default(self) -> bool:
        return (self.scoring, self.recency, self.model_weight) == ("forecast", "auto", 0.0)

    def settings(self) -> str:
        if self.scoring == "seed":
            return "DEPLOYFLAG_SCORING=seed"
        return (
            f"DEPLOYFLAG_SCORING=forecast DEPLOYFLAG_RECENCY={self.recency} "
            f"DEPLOYFLAG_MODEL_WEIGHT={self.model_weight:g}"
        )


class BacktestReport(BaseModel):
    repo_id: int | str
    cut: datetime
    shortcodes_before: int  # scored from the rows up to the cut
    shortcodes_compared: int  # of those, the ones with events after the cut
    later_events: int
    later_fixes: int
    candidates: list[Candidate]
    verdict: str
    enough_data: bool


def _label(recency: Recency) -> str:
    return recency if isinstance(recency, str) else f"{recency:g}"


def _before(request: TrainingRequest, cut: datetime) -> TrainingRequest:
    return request.model_copy(
        update={
            "analysis_run": [r for r in request.analysis_run if r["created_at"] <= cut],
            "historical_run": [r for r in request.historical_run if r["timestamp"] <= cut],
        }
    )


def _top_third_share(weights: list[float], fixes: list[float], names: list[str]) -> float | None:
    total = sum(fixes)
    if total == 0:
        return None
    order = sorted(range(len(names)), key=lambda i: (-weights[i], names[i]))
    top = order[: math.ceil(len(order) / 3)]
    return round(sum(fixes[i] for i in top) / total, 4)


def candidates(base: PipelineConfig) -> list[PipelineConfig]:
    seed = base.model_copy(update={"scoring": "seed"})
    forecasts = [
        base.model_copy(update={"scoring": "forecast", "recency": r, "model_weight": w})
        for r in RECENCIES
        for w in BLENDS
    ]
    return [seed, *forecasts]


def run(request: TrainingRequest, base: PipelineConfig) -> BacktestReport:
    cols = events.columns(request)
    t_start, t_end = forecast.time_span(cols)
    cut_us = fix_rate.backtest_cut(t_start, t_end)
    cut = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=cut_us)
    later = pair_events.build(cols)
    n = len(cols.shortcodes)
    count, ratio = fix_rate.observed_after(later.code, later.time, later.label, cut_us, n)
    fixes = count * ratio

    earlier = _before(request, cut)
    seen = _names(earlier)
    index = [i for i, name in enumerate(cols.shortcodes) if name in seen and count[i] > 0]
    compared = [cols.shortcodes[i] for i in index]
    rows: list[Candidate] = []
    for config in candidates(base):
        result = compute(earlier, config)
        scored = {s.issue_shortcode: float(s.issue_weight) for s in result.scores}
        weights = [scored[name] for name in compared]
        rho = (
            fix_rate.spearman(np.asarray(weights), ratio[index])
            if len(index) >= MIN_SHORTCODES
            else None
        )
        is_seed = config.scoring == "seed"
        rows.append(
            Candidate(
                scoring=config.scoring,
                recency=None if is_seed else _label(config.recency),
                model_weight=None if is_seed else config.model_weight,
                spearman=None if rho is None else round(rho, 4),
                top_third_share=_top_third_share(weights, fixes[index].tolist(), compared),
                roc_auc=result.model.roc_auc,
                half_life_days=result.model.half_life_days,
            )
        )
    after = later.time > cut_us
    report = BacktestReport(
        repo_id=request.repo_id,
        cut=cut,
        shortcodes_before=len(seen),
        shortcodes_compared=len(compared),
        later_events=int(after.sum()),
        later_fixes=int(later.label[after].sum()),
        candidates=rows,
        verdict="",
        enough_data=len(compared) >= MIN_SHORTCODES,
    )
    return report.model_copy(update={"verdict": verdict(report)})


def _names(request: TrainingRequest) -> set[str]:
    return {r["shortcode"] for r in request.analysis_run} | {
        r["shortcode"] for r in request.historical_run
    }


def verdict(report: BacktestReport) -> str:
    """One plain sentence: which settings suit this repository, or why there is no answer."""
    if not report.enough_data:
        return (
            f"too small for a verdict: {report.shortcodes_compared} shortcode(s) have events "
            f"after the cut, {MIN_SHORTCODES} are needed; keep the defaults"
        )
    scored = [c for c in report.candidates if c.spearman is not None]
    if not scored:
        return "no verdict: the weights or the later fix shares are all equal; keep the defaults"
    default = next(c for c in report.candidates if c.is_default)
    best = max(scored, key=lambda c: (c.spearman or 0.0, c.is_default))
    if default.spearman is not None and (best.spearman or 0.0) - default.spearman < CLEAR_MARGIN:
        lead = "rank best" if best.is_default else f"are within {CLEAR_MARGIN} of the best"
        return (
            f"keep the defaults (forecast scoring, recency auto, no model blend): they {lead} "
            f"here (Spearman {default.spearman:.3f})"
        )
    return (
        f"{best.settings()} ranked best here (Spearman {best.spearman:.3f} vs "
        f"{'n/a' if default.spearman is None else f'{default.spearman:.3f}'} for the defaults); "
        "check it on a second payload of this repository before changing the defaults"
    )
