"""Aligned plain-text tables for people (the commands print JSON for scripts by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployflag.messages import ModelReport, Score, TrainingResult

# Score fields shown first, in this order; any other field of Score follows in its own order, so
# a field added to the model shows up in the table without a change here.
SCORE_COLUMNS = (
    "issue_shortcode",
    "issue_weight",
    "fix_probability",
    "fix_rate",
    "daily_weighted_fix_rate",
    "historical_weighted_fix_rate",
    "severity_score",
    "events",
)
HEADINGS = {
    "issue_shortcode": "shortcode",
    "issue_weight": "weight",
    "fix_probability": "fix probability",
    "fix_rate": "fix rate",
    "daily_weighted_fix_rate": "daily rate",
    "historical_weighted_fix_rate": "historical rate",
    "severity_score": "severity",
    "events": "events",
}


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render(headings: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    texts = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headings]
    for row in texts:
        widths = [max(w, len(t)) for w, t in zip(widths, row, strict=True)]
    right = [bool(rows) and all(_numeric(row[i]) for row in rows) for i in range(len(headings))]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line(list(headings)), line(["-" * w for w in widths])]
    out.extend(line(row) for row in texts)
    return "\n".join(out)


def score_columns() -> list[str]:
    fields = list(Score.model_fields)
    known = [name for name in SCORE_COLUMNS if name in fields]
    return known + [name for name in fields if name not in known]


def scores_table(scores: Sequence[Score]) -> str:
    columns = score_columns()
    ordered = sorted(scores, key=lambda s: (-s.issue_weight, s.issue_shortcode))
    rows = [[getattr(score, name) for name in columns] for score in ordered]
    return render([HEADINGS.get(name, name.replace("_", " ")) for name in columns], rows)


def model_summary(model: ModelReport) -> str:
    lines = [f"model: {model.estimator}, {'trained' if model.trained else 'not trained'}"]
    if model.skipped_reason:
        lines.append(f"  skipped: {model.skipped_reason}")
    lines.append(
        f"  held-out ROC AUC {cell(model.roc_auc)}, precision {cell(model.precision)}, "
        f"{model.training_rows} training rows, {model.training_seconds:.3f} s"
    )
    extra = {
        name: getattr(model, name)
        for name in ModelReport.model_fields
        if name
        not in {
            "trained",
            "skipped_reason",
            "estimator",
            "parameters",
            "roc_auc",
            "precision",
            "training_rows",
            "training_seconds",
        }
    }
    if extra:
        lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {cell(v)}" for k, v in extra.items()))
    if model.parameters:
        params = ", ".join(f"{k}={v}" for k, v in sorted(model.parameters.items()))
        lines.append(f"  parameters: {params}")
    return "\n".join(lines)


def result_table(result: TrainingResult) -> str:
    head = f"request {result.request_id} · repo {result.repo_id} · {len(result.scores)} issues"
    return "\n".join([head, "", scores_table(result.scores), "", model_summary(result.model)])
