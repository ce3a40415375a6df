"""``deployflag backtest``: the backtest report as a table for people or JSON for scripts."""

from __future__ import annotations

from deployflag.pipeline.backtest import BacktestReport
from deployflag.texttable import render

COLUMNS = ("scoring", "recency", "blend", "half-life", "Spearman", "top third", "model AUC")


def _short(value: float | None) -> str | None:
    """0.2 and 60 rather than 0.2000 and 60.0000."""
    return None if value is None else f"{value:g}"


def render_table(report: BacktestReport) -> str:
    rows = [
        (
            c.scoring,
            c.recency,
            _short(c.model_weight),
            _short(c.half_life_days),
            c.spearman,
            c.top_third_share,
            c.roc_auc,
        )
        for c in report.candidates
    ]
    lines = [
        f"backtest of repository {report.repo_id}: cut at {report.cut:%Y-%m-%d %H:%M} UTC "
        "(80 % of the time span)",
        f"{report.shortcodes_before} shortcode(s) scored from the rows before it; "
        f"{report.shortcodes_compared} have events after it ({report.later_events} events, "
        f"{report.later_fixes} fixes)",
        "Spearman: weights vs each shortcode's share of fixed events after the cut; "
        "top third: share of the later fixes in the top-weighted third",
        "",
    ]
    lines += [render(COLUMNS, rows), "", f"verdict: {report.verdict}"]
    return "\n".join(lines)
