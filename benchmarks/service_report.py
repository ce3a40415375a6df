"""The service benchmark's results: what was measured (Plan, Row, Results) and how it reads
(the markdown report and the throughput plot). bench_service.py measures; this module only
renders, so a report can be changed and re-read without running anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from harness import Run, median

# The systems compared, as they are named in the report.
SERVE_DEFAULT = "deployflag serve (default: prefetch = workers + burst window)"
SERVE_FIXED = "deployflag serve (fixed prefetch = workers, no burst window)"
CELERY_ORIGINAL = "Celery as the original (max_tasks_per_child=1, prefetch ×1)"
CELERY_GOOD = "Celery well-configured (prefork, defaults)"
RAW = "raw aio-pika consume → reply → ack (ceiling)"


@dataclass(frozen=True)
class Plan:
    repeats: int
    small: int  # requests per batch, part 1
    small_original: int  # the original-config Celery is ~40x slower: fewer requests per batch
    solo: int  # one-at-a-time requests per batch, for latency without queueing
    solo_original: int
    reference: int
    large_repeats: int
    long: int
    window: int = 1000
    warmup: int = 50
    prefetch_knob: int = 8  # part 1's fixed-window serve row (--prefetch-knob; 8: 4 × workers)

    @classmethod
    def full(cls, repeats: int) -> Plan:
        return cls(repeats, 2000, 150, 100, 20, 16, repeats, 10_000)

    @classmethod
    def quick(cls, repeats: int) -> Plan:
        return cls(repeats, 500, 60, 30, 8, 6, 1, 3000, window=500, warmup=20)


@dataclass
class Row:
    """One system in one part: per-batch figures, reported as medians."""

    part: str
    system: str
    workers: int
    throughput: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    solo_p50: list[float] = field(default_factory=list)
    solo_p95: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    requests: int = 0

    def add_burst(self, run: Run) -> None:
        self.throughput.append(run.throughput)
        self.p50.append(run.p(50))
        self.p95.append(run.p(95))
        self.requests = run.count

    def add_solo(self, run: Run) -> None:
        self.solo_p50.append(run.p(50))
        self.solo_p95.append(run.p(95))

    def reset(self) -> None:
        for values in (self.throughput, self.p50, self.p95, self.solo_p50, self.solo_p95):
            values.clear()
        self.extra.clear()

    def note(self, key: str, value: float) -> None:
        self.extra.setdefault(key, []).append(value)

    def m(self, key: str) -> float:
        values = getattr(self, key) if hasattr(self, key) else self.extra.get(key, [])
        return median(values)


@dataclass
class Results:
    plan: Plan
    rows: list[Row] = field(default_factory=list)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    long_windows: list[float] = field(default_factory=list)
    long_rss: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    command: str = ""
    src: Path | None = None  # a copy of src/ on PYTHONPATH, else the installed package
    source: str = ""
    machine: dict[str, str] = field(default_factory=dict)
    quiet_wait: float = 30.0
    skip_original: bool = False

    def row(self, part: str, system: str, workers: int) -> Row:
        for row in self.rows:
            if (row.part, row.system, row.workers) == (part, system, workers):
                return row
        row = Row(part, system, workers)
        self.rows.append(row)
        return row

    def find(self, part: str, system: str, workers: int) -> Row | None:
        for row in self.rows:
            if (row.part, row.system, row.workers) == (part, system, workers):
                return row
        return None


# --- the report -----------------------------------------------------------------------------------


def fmt(value: float, digits: int = 1) -> str:
    if value != value:  # NaN
        return "—"
    return f"{value:,.{digits}f}"


def ms(value: float) -> str:
    return fmt(value * 1e3, 1)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(res: Results, elapsed: float) -> str:
    plan = res.plan
    info = res.machine
    out: list[str] = []
    add = out.append
    add("# Service benchmark results\n")
    add(
        f"`benchmarks/bench_service.py {res.command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{elapsed / 60:.1f} min; deployflag from {res.source}.\n"
    )
    add(
        f"Machine: {info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Python "
        f"{info['python']}, RabbitMQ {info['rabbitmq']} (loopback), Celery {info['celery']}, "
        f"SQLite {info['sqlite']}; fsync of 4 kB at the start: {info['fsync']} ms (median); "
        f"load average at the start: {info['load']}.\n"
    )
    add(
        f"Each figure is the median of {plan.repeats} batches on one process (after a warm-up); "
        "the long run is one batch read in windows. Latency runs from the publisher's timestamp "
        "to the reply's arrival at the collector, matched by correlation id: *burst* latency "
        "includes the wait in the queue (every request is published at once), *one at a time* "
        "has a single request in flight. *Other load*: CPU used meanwhile by processes that are "
        "neither the benchmark's nor the broker's (other people's tests on a shared machine), "
        "in cores; with 2 cores, anything above ~0.2 lowers the figures.\n"
    )

    for part in ("overhead", "postgres"):
        small_table(res, part, add)

    reference = [r for r in res.rows if r.part == "reference"]
    reference = [r for r in res.rows if r.part == "reference"]
    if reference:
        add(f"## 2–3. Reference payloads, each trains a model ({plan.reference} per batch)\n")
        add(
            "| system | workers | req/s (range) | burst p50 s | burst p95 s "
            "| loop lag p99 / max ms | /healthz p50 / p99 / max ms | other load |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in reference:
            health = (
                f"{ms(r.m('healthz_p50'))} / {ms(r.m('healthz_p99'))} / {ms(r.m('healthz_max'))}"
                if "healthz_p50" in r.extra
                else "—"
            )
            add(
                f"| {r.system} | {r.workers} | {spread(r, 2)} | "
                f"{fmt(r.m('p50'), 2)} | {fmt(r.m('p95'), 2)} | {lag(r)} | {health} | "
                f"{fmt(r.m('other_load'), 2)} |"
            )
        add("")

    large = [r for r in res.rows if r.part == "large"]
    if large:
        add(f"## 4. Large payloads, one at a time ({plan.large_repeats} runs)\n")
        add(
            "| system | seconds end to end | peak RSS main process MB | peak RSS worker MB "
            "| loop lag max ms |"
        )
        add("|---|---:|---:|---:|---:|")
        for r in large:
            add(
                f"| {r.system} | {fmt(r.m('seconds'), 2)} | {fmt(r.m('rss_main'), 0)} | "
                f"{fmt(r.m('rss_worker'), 0)} | {lag_max(r)} |"
            )
        add("")

    if res.long_windows:
        lr, w = res.long_rss, res.long_windows
        long_row = res.find("long", "deployflag serve", 2)
        add(f"## 5. Long run ({plan.long} small requests, one batch, windows of {plan.window})\n")
        add("| window | " + " | ".join(str(i + 1) for i in range(len(w))) + " |")
        add("|---|" + "---:|" * len(w))
        add("| req/s | " + " | ".join(fmt(x, 0) for x in w) + " |\n")
        add(
            f"Overall {fmt(long_row.m('throughput') if long_row else float('nan'))} req/s; "
            f"slowest/fastest window {min(w) / max(w):.2f}, last/first {w[-1] / w[0]:.2f}. "
            f"Service RSS: {lr['start_mb']:.0f} MB before, {lr['after_first_window_mb']:.0f} MB "
            f"after the first window, {lr['end_mb']:.0f} MB at the end (peak "
            f"{lr['peak_mb']:.0f} MB): growth **{lr['growth_pct']:+.1f} %** after warm-up. "
            f"Largest worker: {lr['worker_peak_mb']:.0f} MB. Other load "
            f"{fmt(long_row.m('other_load') if long_row else float('nan'), 2)} cores.\n"
        )

    if res.stages:
        add(
            "## Where the service's time goes\n\nMean seconds per request of each stage, from "
            "the service's own `deployflag_stage_seconds` (first batch). With prefetch 2 a "
            "stage's time includes waiting for the store's writer (claim, record).\n"
        )
        names = ("decode", "claim", "pipeline", "record", "publish", "total")
        add("| run | " + " | ".join(f"{n} ms" for n in names) + " |")
        add("|---|" + "---:|" * len(names))
        for name, means in res.stages.items():
            add(f"| {name} | " + " | ".join(ms(means.get(n, float("nan"))) for n in names) + " |")
        add("")

    add(targets(res))
    if res.retries or res.failures:
        add("## Interruptions\n")
        for note in res.retries:
            add(f"- retried: {note}")
        for note in res.failures:
            add(f"- **failed**: {note}")
        add("")
    return "\n".join(out)


def lag(row: Row) -> str:
    """p99 / max; "≤" marks a maximum known only as a histogram bucket's upper edge."""
    if "lag_p99" not in row.extra:
        return "—"
    return f"{ms(row.m('lag_p99'))} / {lag_max(row)}"


def lag_max(row: Row) -> str:
    if "lag_max" not in row.extra:
        return "—"
    bound = "≤ " if any(row.extra.get("lag_max_bound", [])) else ""
    return f"{bound}{ms(row.m('lag_max'))}"


def spread(row: Row, digits: int = 1) -> str:
    """The median, and the range over the batches when there are several."""
    values = row.throughput
    text = fmt(row.m("throughput"), digits)
    if len(values) > 1:
        text += f" ({fmt(min(values), digits)}–{fmt(max(values), digits)})"
    return text


def small_table(res: Results, part: str, add: Callable[[str], None]) -> None:
    plan = res.plan
    overhead = [r for r in res.rows if r.part == part]
    if not overhead:
        return
    if part == "overhead":
        add(
            f"## 1. Small requests, no model ({plan.small} per batch; Celery as the original: "
            f"{plan.small_original}; one at a time: {plan.solo} / {plan.solo_original})\n"
        )
    else:
        add(
            f"## 1b. The same on PostgreSQL ({plan.small} per batch; one throwaway cluster with "
            "fsync off, a fresh database per system)\n"
        )
    add(
        "| system | conc. | req/s (range) | burst p50 ms | burst p95 ms | one at a time p50 ms "
        "| one at a time p95 ms | loop lag p99 / max ms | CPU ms/req main / children "
        "| other load |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in overhead:
        add(
            f"| {r.system} | {r.workers} | {spread(r)} | {ms(r.m('p50'))} | "
            f"{ms(r.m('p95'))} | {ms(r.m('solo_p50'))} | {ms(r.m('solo_p95'))} | "
            f"{lag(r)} | {fmt(r.m('cpu_main_ms'), 2)} / {fmt(r.m('cpu_children_ms'), 2)} | "
            f"{fmt(r.m('other_load'), 2)} |"
        )
    add("")


def targets(res: Results) -> str:
    lines = ["## Targets (from the issue)\n", "| target | measured | verdict |", "|---|---|---|"]
    good = res.find("overhead", CELERY_GOOD, 2)
    orig = res.find("overhead", CELERY_ORIGINAL, 2)
    raw = res.find("overhead", RAW, 1)
    services = [
        r for r in res.rows if r.part == "overhead" and r.system.startswith("deployflag serve")
    ]
    for s in services:
        tag = s.system.removeprefix("deployflag serve ")
        tput = s.m("throughput")
        if good is not None:
            ratio = tput / good.m("throughput")
            lines.append(
                f"| small requests, serve {tag}: ≥ 1.5× Celery well-configured at concurrency 2 "
                f"| {ratio:.2f}× | {verdict(ratio >= 1.5)} |"
            )
        if orig is not None:
            ratio = tput / orig.m("throughput")
            lines.append(
                f"| small requests, serve {tag}: ≥ 30× Celery as the original | {ratio:.1f}× | "
                f"{verdict(ratio >= 30)} |"
            )
        if raw is not None:
            lines.append(
                f"| small requests, serve {tag}: share of the raw broker ceiling | "
                f"{tput / raw.m('throughput'):.0%} | (context) |"
            )
    pg_serve = res.find("postgres", SERVE_DEFAULT, 2)
    pg_good = res.find("postgres", CELERY_GOOD, 2)
    if pg_serve is not None and pg_good is not None:
        ratio = pg_serve.m("throughput") / pg_good.m("throughput")
        lines.append(
            f"| PostgreSQL: small requests, serve (default) vs Celery well-configured | "
            f"{ratio:.2f}× | {verdict(ratio >= 1.5)} |"
        )
    for s in services:
        if "cpu_main_ms" in s.extra:
            cpu = s.m("cpu_main_ms")
            lines.append(
                f"| small requests, serve {s.system.removeprefix('deployflag serve ')}: "
                f"main-process CPU ≤ 2.5 ms per request | {cpu:.2f} ms | {verdict(cpu <= 2.5)} |"
            )
        solo = s.m("solo_p50")
        lines.append(
            f"| small requests, serve {s.system.removeprefix('deployflag serve ')}: one at a "
            f"time p50 ≤ 3 ms | {solo * 1e3:.1f} ms | {verdict(solo <= 0.003)} |"
        )
    one = res.find("reference", "deployflag serve", 1)
    two = res.find("reference", "deployflag serve", 2)
    if one and two:
        ratio = two.m("throughput") / one.m("throughput")
        lines.append(
            f"| reference: 2 workers ≥ 1.8× one | {ratio:.2f}× | {verdict(ratio >= 1.8)} |"
        )
        lines.append(
            f"| event-loop lag p99 ≤ 20 ms, pool saturated (reference, 2 workers) | "
            f"{lag(two)} ms (p99 / max) | "
            f"{verdict(two.m('lag_p99') <= 0.020)} |"
        )
    for conc in (1, 2):
        ours = res.find("reference", "deployflag serve", conc)
        theirs = res.find("reference", CELERY_GOOD, conc)
        if ours and theirs:
            ratio = ours.m("throughput") / theirs.m("throughput")
            lines.append(
                f"| reference: ahead of Celery well-configured at concurrency {conc} | "
                f"{ratio:.2f}× | {verdict(ratio > 1.0)} |"
            )
    serve = res.find("overhead", SERVE_DEFAULT, 2)
    if serve is not None and "lag_p99" in serve.extra:
        lines.append(
            f"| (context) event-loop lag p99 with small requests, loop saturated | "
            f"{lag(serve)} ms (p99 / max) | "
            f"{verdict(serve.m('lag_p99') <= 0.020)} |"
        )
    if res.long_rss:
        growth = res.long_rss["growth_pct"]
        lines.append(f"| long run: RSS growth < 5 % | {growth:+.1f} % | {verdict(growth < 5)} |")
    return "\n".join(lines) + "\n"


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for system, marker in (
        ("deployflag serve", "o"),
        (CELERY_GOOD, "s"),
        (CELERY_ORIGINAL, "^"),
    ):
        rows = sorted(
            (r for r in res.rows if r.part == "reference" and r.system == system and r.throughput),
            key=lambda r: r.workers,
        )
        if rows:
            ax.plot(
                [r.workers for r in rows],
                [r.m("throughput") for r in rows],
                marker=marker,
                label=system,
            )
    one = res.find("reference", "deployflag serve", 1)
    if one is not None and one.throughput:
        ax.plot(
            [1, 2],
            [one.m("throughput"), 2 * one.m("throughput")],
            ":",
            color="grey",
            label="linear scaling of serve",
        )
    ax.set_xlabel("workers (pool size / Celery concurrency)")
    ax.set_ylabel("requests/s")
    ax.set_xticks([1, 2])
    ax.set_ylim(bottom=0)
    ax.set_title("reference payloads (each trains a model)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    ax = axes[1]
    rows = [r for r in res.rows if r.part == "overhead" and r.throughput]
    if rows:
        labels = [r.system.replace(" (", "\n(") for r in rows]
        bars = ax.barh(labels, [r.m("throughput") for r in rows], color="tab:blue")
        ax.bar_label(bars, fmt="%.0f", fontsize=8, padding=2)
        ax.set_xscale("log")
        ax.set_xlabel("requests/s (log scale)")
        ax.set_title("small requests (no model), 2 workers / concurrency 2")
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------
