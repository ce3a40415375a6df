"""Fairness between instances: does a wider prefetch window make one instance sit on work that
another could start?

    python benchmarks/bench_fairness.py [--repeats N] [--blocks N] [--out DIR]

Two `deployflag serve` instances with one worker each consume one training queue. A long
request is the reference payload trained with seed scoring and a 6-point grid (about a second
of a worker); a small one trains no model (a few ms). Two patterns:

- backlog: ``--blocks`` blocks of one long request and 20 small ones, published at once;
- trickle: ``--blocks`` times, one long request and 6 small ones published at once, the next
  group once every reply is in. While one instance trains, the other is free for the small
  ones, unless the busy one has taken them.

Three windows are compared, each in its own pair of fresh instances:

- fixed prefetch = workers (1), no burst window: the narrowest window;
- fixed prefetch 4 × workers (4), no burst window: what a deployment tuned for small requests
  would set by hand;
- the default: prefetch = workers plus the burst window (3 more while requests are short).

Per batch: the makespan (first publish to last reply), the long and the small requests'
latency, and how the pipeline time split between the instances (``imbalance``: |a − b| / (a + b)
of their ``deployflag_stage_seconds{stage="pipeline"}`` sums; 0 is an even split). A window
that makes requests wait behind a long one on a busy instance while the other could start them
shows as a larger small-request p95 and max in the trickle. Results: stdout and
benchmarks/results/fairness.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import orjson

from bench_service import TRAINING_TASK, log, machine, running, small_payload
from deployflag.submit import celery_message
from deployflag.synthetic import generate
from harness import (
    Driver,
    Names,
    Proc,
    Run,
    bench_vhost,
    install_signal_cleanup,
    median,
    percentile,
    scrape,
    start_service,
)

BENCH_DIR = Path(__file__).resolve().parent
SMALL_PER_BLOCK = 20
TRICKLE_SMALL = 6
# The long requests: about a second each (seed scoring, a 6-point gradient-boosting grid).
SLOW = {
    "DEPLOYFLAG_SCORING": "seed",
    "DEPLOYFLAG_MODEL_PARAM_GRID": (
        '{"learning_rate":[0.1],"max_depth":[2,3,5],"max_iter":[100,300],'
        '"l2_regularization":[1.0],"min_samples_leaf":[20]}'
    ),
}
CONFIGS = (
    ("fixed prefetch = workers (1), no burst window", {"DEPLOYFLAG_BURST_PREFETCH": "0"}),
    (
        "fixed prefetch 4 × workers (4), no burst window",
        {"DEPLOYFLAG_PREFETCH": "4", "DEPLOYFLAG_BURST_PREFETCH": "0"},
    ),
    ("default: prefetch = workers + burst window (3)", {}),
)


@dataclass
class Row:
    config: str
    makespan: list[float] = field(default_factory=list)
    long_p50: list[float] = field(default_factory=list)
    long_max: list[float] = field(default_factory=list)
    small_p50: list[float] = field(default_factory=list)
    small_p95: list[float] = field(default_factory=list)
    small_max: list[float] = field(default_factory=list)
    imbalance: list[float] = field(default_factory=list)
    opened: list[float] = field(default_factory=list)
    handed_back: list[float] = field(default_factory=list)

    def last(self) -> str:
        return (
            f"makespan {self.makespan[-1]:6.2f} s  long p50 {self.long_p50[-1]:5.2f} s max "
            f"{self.long_max[-1]:5.2f} s  small p50 {self.small_p50[-1]:5.3f} s p95 "
            f"{self.small_p95[-1]:5.3f} s max {self.small_max[-1]:5.3f} s  imbalance "
            f"{self.imbalance[-1]:.2f}  burst opened {self.opened[-1]:.0f}×, handed back "
            f"{self.handed_back[-1]:.0f}"
        )


def pipeline_seconds(port: int) -> float:
    samples = scrape(port).get("deployflag_stage_seconds_sum", {})
    return sum(v for k, v in samples.items() if dict(k).get("stage") == "pipeline")


def burst_counts(port: int) -> tuple[float, float]:
    """(times the burst window opened, deliveries it handed back) so far."""
    samples = scrape(port)
    changes = samples.get("deployflag_burst_window_changes_total", {})
    opened = sum(v for k, v in changes.items() if dict(k).get("change") == "opened")
    back = sum(samples.get("deployflag_burst_handed_back_total", {}).values())
    return opened, back


@dataclass(frozen=True)
class Pattern:
    """How a batch is published: ``bursts`` times, ``size`` requests at once (waiting for all
    their replies), in blocks of ``block``: one long request, then small ones."""

    name: str
    bursts: int
    size: int
    block: int

    @property
    def count(self) -> int:
        return self.bursts * self.size


def patterns(args: Args) -> tuple[Pattern, Pattern]:
    return (
        Pattern("backlog", 1, args.blocks * (1 + SMALL_PER_BLOCK), 1 + SMALL_PER_BLOCK),
        Pattern("trickle", args.blocks, 1 + TRICKLE_SMALL, 1 + TRICKLE_SMALL),
    )


async def measure(
    url: str, work: Path, rows: dict[str, Row], env: dict[str, str], args: Args
) -> None:
    reference, small = orjson.dumps(generate("reference")), small_payload()
    kinds: dict[str, str] = {}
    names = Names()
    procs = [
        start_service(
            url, names, work, workers=1, tag=f"fair-{names.suffix}-{i}", extra_env=SLOW | env
        )
        for i in range(2)
    ]
    with running(procs[0][0]), running(procs[1][0]):
        async with Driver(url, names) as driver:
            for pattern in patterns(args):
                order = itertools.cycle(["long"] + ["small"] * (pattern.block - 1))

                def make(rid: str, order: Iterator[str] = order) -> aio_pika.Message:
                    kinds[rid] = kind = next(order)
                    body = reference if kind == "long" else small
                    return celery_message(body, TRAINING_TASK, rid)

                row = rows[pattern.name]
                await driver.burst(make, 1 + SMALL_PER_BLOCK, 120)  # warm-up
                for i in range(args.repeats):
                    await batch(driver, procs, pattern, make, kinds, row)
                    log(f"  {pattern.name:<8} {row.config[:48]:<48} batch {i + 1}: {row.last()}")


async def batch(
    driver: Driver,
    procs: list[tuple[Proc, int]],
    pattern: Pattern,
    make: Callable[[str], aio_pika.Message],
    kinds: dict[str, str],
    row: Row,
) -> None:
    before = [pipeline_seconds(port) for _, port in procs]
    counts = [burst_counts(port) for _, port in procs]
    sent: dict[str, float] = {}
    received: dict[str, float] = {}
    for _ in range(pattern.bursts):
        run = await driver.burst(make, pattern.size, 600)
        sent.update(run.sent)
        received.update(run.received)
    run = Run(sent=sent, received=received)
    after = [pipeline_seconds(port) for _, port in procs]
    a, b = (x - y for x, y in zip(after, before, strict=True))
    latency = {r: run.received[r] - run.sent[r] for r in run.received}
    longs = [v for r, v in latency.items() if kinds[r] == "long"]
    smalls = [v for r, v in latency.items() if kinds[r] == "small"]
    row.makespan.append(run.seconds)
    row.long_p50.append(percentile(longs, 50))
    row.long_max.append(max(longs))
    row.small_p50.append(percentile(smalls, 50))
    row.small_p95.append(percentile(smalls, 95))
    row.small_max.append(max(smalls))
    row.imbalance.append(abs(a - b) / (a + b))
    now = [burst_counts(port) for _, port in procs]
    row.opened.append(sum(n[0] - c[0] for n, c in zip(now, counts, strict=True)))
    row.handed_back.append(sum(n[1] - c[1] for n, c in zip(now, counts, strict=True)))


@dataclass
class Args:
    repeats: int
    blocks: int


def report(
    rows: dict[tuple[str, str], Row], args: Args, elapsed: float, where: dict[str, str]
) -> str:
    backlog, trickle = patterns(args)
    lines = [
        "# Fairness between instances: benchmarks/bench_fairness.py",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {elapsed / 60:.1f} min; "
        + ", ".join(f"{k}: {v}" for k, v in where.items()),
        "",
        "Two instances, one worker each, one queue; a long request is the reference payload "
        "trained with seed scoring and a 6-point grid (about a second of a worker), a small one "
        f"trains no model. Medians of {args.repeats} batches (range in brackets).",
        "",
        f"- **backlog**: {args.blocks} blocks of 1 long + {SMALL_PER_BLOCK} small requests, "
        f"{backlog.count} published at once;",
        f"- **trickle**: {trickle.bursts} times, 1 long + {TRICKLE_SMALL} small requests "
        "published at once, the next group once all are answered: while one instance trains, "
        "the other is free for the small ones.",
        "",
        "| pattern | window | makespan s | long p50 s | long max s | small p50 s | small p95 s "
        "| small max s | imbalance | burst window opened | handed back |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(values: list[float], digits: int = 2) -> str:
        return f"{median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"

    for (pattern, config), r in rows.items():
        lines.append(
            f"| {pattern} | {config} | {cell(r.makespan)} | {cell(r.long_p50)} | "
            f"{cell(r.long_max)} | {cell(r.small_p50, 3)} | {cell(r.small_p95, 3)} | "
            f"{cell(r.small_max, 3)} | {cell(r.imbalance)} | {median(r.opened):.0f}× | "
            f"{median(r.handed_back):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    ns = parser.parse_args(argv)
    args = Args(ns.repeats, ns.blocks)
    install_signal_cleanup()
    work = Path(tempfile.mkdtemp(prefix="deployflag-fair-"))
    rows = {
        (pattern.name, config): Row(config) for pattern in patterns(args) for config, _ in CONFIGS
    }
    started = time.monotonic()
    try:
        with bench_vhost() as url:
            for config, env in CONFIGS:
                by_pattern = {p.name: rows[p.name, config] for p in patterns(args)}
                asyncio.run(measure(url, work, by_pattern, env, args))
    finally:
        Proc.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    where = machine(Path(tempfile.gettempdir()))
    text = report(rows, args, time.monotonic() - started, where)
    print(text)
    ns.out.mkdir(parents=True, exist_ok=True)
    (ns.out / "fairness.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
