"""``deployflag backtest``: the backtest report as a table for people or JSON for scripts."""

from __future__ import annotations

from deployflag.pipeline.backtest import BacktestReport

COLUMNS = ("scoring", "recency", "blend", "half-life", "Spearman", "top third", "model AUC")


def _cell(value: object, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def render_table(report: BacktestReport) -> str:
    rows = [
        (
            c.scoring,
            c.recency,
            c.model_weight,
            c.half_life_days if c.scoring == "forecast" else None,
            c.spearman,
            c.top_third_share,
            c.roc_auc,
        )
        for c in report.candidates
    ]
    specs = ("", "", "g", "g", ".3f", ".3f", ".3f")
    cells = [
        COLUMNS,
        *[tuple(_cell(v, f) for v, f in zip(row, specs, strict=True)) for row in rows],
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
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
    for i, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", f"verdict: {report.verdict}"]
    return "\n".join(lines)
