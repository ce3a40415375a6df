"""Interleaved A/B of small requests: service variants (and Celery) side by side, in turn.

    python benchmarks/bench_ab.py [--rounds N] [--count N] [--solo N] [--warmup N] [--postgres] \\
        [--payload small|reference] [--out FILE] NAME=SOURCE [NAME=SOURCE ...]

SOURCE is ``serve:REF`` (``deployflag serve`` from a frozen copy of git commit REF, or ``serve:.``
for the working tree), ``celery:REF`` (the well-configured Celery baseline running that code), and
may end in ``,VAR=VALUE,...`` for the service's environment (``serve:HEAD,DEPLOYFLAG_PREFETCH=8``).

Why: on a shared VM a machine's speed drifts by 10–30 % within the hour, so the sequential rows of
``bench_service.py`` (each configuration measured in its own minutes) give ratios that move with
the hour. Here every variant runs at once, each on its own queues and database, and each round
sends a burst of ``--count`` small requests (then ``--solo`` lone ones) to every variant in turn,
in an order that rotates: a slow minute lands on all of them. The table gives the medians over the
rounds and, against the first variant, the median of the per-round ratios with their range.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench_service import export_ref, factory, migrate_database, small_payload
from deployflag.metrics import STAGES
from deployflag.synthetic import generate
from harness import (
    BENCH_DIR,
    Driver,
    ForeignLoad,
    MessageFactory,
    Names,
    Proc,
    ProcessCpu,
    bench_vhost,
    buckets,
    histogram_quantile,
    install_signal_cleanup,
    median,
    scrape,
    start_celery,
    start_service,
)

OUT = BENCH_DIR / "results" / "ab.md"
PAYLOADS: dict[str, Callable[[], bytes]] = {
    "small": small_payload,
    "reference": lambda: orjson.dumps(generate("reference", seed=1)),  # as bench_service.py
}
STAGE_SUM = "deployflag_stage_seconds_sum"
LAG_BUCKET = "deployflag_event_loop_lag_seconds_bucket"


@dataclass
class Variant:
    name: str
    system: str  # "serve" or "celery"
    ref: str
    env: dict[str, str]
    src: Path | None = None
    source: str = ""
    rps: list[float] = field(default_factory=list)
    main_ms: list[float] = field(default_factory=list)
    children_ms: list[float] = field(default_factory=list)
    solo_ms: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    port: int | None = None  # the service's /metrics (serve only)
    # The service's own mean ms per lone request, by stage, one dict per round (serve only).
    stages: list[dict[str, float]] = field(default_factory=list)
    # The event-loop lag histogram's buckets, summed over every round's burst (serve only).
    lag: dict[float, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Variant:
        name, sep, spec = text.partition("=")
        system, _, rest = spec.partition(":")
        if not sep or not name or system not in ("serve", "celery") or not rest:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected NAME=serve:REF or NAME=celery:REF"
            )
        ref, *assignments = rest.split(",")
        env = {}
        for item in assignments:
            key, eq, value = item.partition("=")
            if not eq or not key.startswith("DEPLOYFLAG_"):
                raise argparse.ArgumentTypeError(f"{item!r}: expected DEPLOYFLAG_VAR=VALUE")
            env[key] = value
        if env and system == "celery":
            raise argparse.ArgumentTypeError(f"{text!r}: settings apply to serve only")
        return cls(name, system, ref, env)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def start(variant: Variant, url: str, names: Names, work: Path, db_url: str | None) -> Proc:
    tag = f"ab-{variant.name}-{names.suffix}"
    if variant.system == "celery":
        return start_celery(
            url, names, work, concurrency=2, original=False, src=variant.src, tag=tag, db_url=db_url
        )
    proc, variant.port = start_service(
        url, names, work, workers=2, src=variant.src, tag=tag, extra_env=variant.env, db_url=db_url
    )
    return proc


def lag_summary(lag: dict[float, float]) -> str:
    """p99 (interpolated in the histogram's buckets) and the share of samples over 10 ms."""
    total = lag.get(float("inf"), 0.0)
    if total <= 0:
        return "—"
    p99 = histogram_quantile(0.99, {}, lag)
    over = 100 * (total - lag.get(0.01, 0.0)) / total
    return f"{1e3 * p99:.1f} / {over:.1f} %"


def stage_seconds(port: int) -> dict[str, float]:
    """{stage: seconds so far} of the service's stage histogram."""
    return {
        dict(key)["stage"]: value
        for key, value in scrape(port).get(STAGE_SUM, {}).items()
        if "stage" in dict(key)
    }


def stage_means(before: dict[str, float], after: dict[str, float], lone: int) -> dict[str, float]:
    """Mean ms per lone request of each stage between two scrapes (a stage a request skipped,
    such as the claim folded into the record, counts as 0 for it)."""
    return {
        stage: 1e3 * (seconds - before.get(stage, 0.0)) / lone for stage, seconds in after.items()
    }


@contextlib.contextmanager
def postgres_cluster(wanted: bool) -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (tests/support/postgres.py), or None."""
    if not wanted:
        yield None
        return
    sys.path.insert(0, str(BENCH_DIR.parent))
    from tests.support.postgres import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("--postgres needs the PostgreSQL server binaries")
    cluster = PostgresCluster(bindir)
    cluster.setup()
    try:
        yield cluster
    finally:
        cluster.close()


async def measure(
    args: argparse.Namespace, make: MessageFactory, variant: Variant, proc: Proc, driver: Driver
) -> str:
    """One round's burst (and lone requests) for one variant; its figures kept on it."""
    lag_before = buckets(scrape(variant.port), LAG_BUCKET, {}) if variant.port is not None else {}
    with ForeignLoad() as other, ProcessCpu(proc.pid) as cpu:
        burst = await driver.burst(make, args.count, 300 + args.count / 5)
    proc.check()
    if variant.port is not None:
        for bound, count in buckets(scrape(variant.port), LAG_BUCKET, {}).items():
            variant.lag[bound] = variant.lag.get(bound, 0.0) + count - lag_before.get(bound, 0.0)
    variant.rps.append(burst.throughput)
    variant.main_ms.append(1e3 * cpu.main / args.count)
    variant.children_ms.append(1e3 * cpu.children / args.count)
    variant.other.append(other.cores)
    line = f"{variant.name}: {burst.throughput:7.1f} req/s"
    if args.solo:
        before = stage_seconds(variant.port) if variant.port is not None else None
        solo = await driver.one_by_one(make, args.solo, 60)
        if before is not None and variant.port is not None:
            variant.stages.append(stage_means(before, stage_seconds(variant.port), args.solo))
        variant.solo_ms.append(solo.p(50) * 1e3)
        line += f", one at a time p50 {variant.solo_ms[-1]:.2f} ms"
    return f"{line}, other load {other.cores:.2f} cores"


async def run(args: argparse.Namespace, variants: list[Variant], work: Path) -> None:
    make = factory(PAYLOADS[args.payload]())
    with postgres_cluster(args.postgres) as cluster, bench_vhost() as url:
        async with contextlib.AsyncExitStack() as stack:
            running: list[tuple[Variant, Proc, Driver]] = []
            for variant in variants:
                names = Names()
                db = None
                if cluster is not None:
                    db = cluster.fresh_database(f"ab_{names.suffix}")
                    await asyncio.to_thread(migrate_database, db, variant.src, work)
                proc = start(variant, url, names, work, db)
                stack.callback(proc.stop)
                driver = await stack.enter_async_context(Driver(url, names))
                await driver.wait_consumer(proc)
                await driver.burst(make, args.warmup, 300)  # imports, caches, the burst window
                running.append((variant, proc, driver))
            for r in range(args.rounds):
                shift = r % len(running)  # a slow minute lands on every variant in turn
                for variant, proc, driver in running[shift:] + running[:shift]:
                    log(f"round {r + 1} " + await measure(args, make, variant, proc, driver))


def _shown(argv: list[str]) -> list[str]:
    """The command line without where its table went."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            out.append(arg)
    return out


def report(args: argparse.Namespace, variants: list[Variant], minutes: float) -> str:
    base = variants[0]
    store = "PostgreSQL (one throwaway cluster, fsync off)" if args.postgres else "SQLite"
    lines = [
        f"# Interleaved A/B of {args.payload} requests: benchmarks/bench_ab.py",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {minutes:.1f} min; "
        f"`{' '.join(_shown(sys.argv[1:]))}`",
        "",
        f"{args.rounds} rounds; each round a burst of {args.count} {args.payload} requests"
        + (f" and {args.solo} one at a time" if args.solo else "")
        + " to every variant in turn (the order rotates); 2 workers / concurrency 2 unless a "
        f"variant sets DEPLOYFLAG_WORKERS; {store}. "
        "Medians over the rounds; the ratio is the median of the per-round ratios to the first "
        "variant, with their range.",
        "",
        "| variant | source | req/s | ratio to "
        + base.name
        + " (range) | CPU ms/req main / children | one at a time p50 ms | loop lag in the bursts: "
        "p99 ms / samples over 10 ms | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        ratios = [a / b for a, b in zip(v.rps, base.rps, strict=True)]
        solo = f"{median(v.solo_ms):.2f}" if v.solo_ms else "—"
        lines.append(
            f"| {v.name} | {v.source} | {median(v.rps):.1f} | {median(ratios):.2f}× "
            f"({min(ratios):.2f}–{max(ratios):.2f}) | {median(v.main_ms):.2f} / "
            f"{median(v.children_ms):.2f} | {solo} | {lag_summary(v.lag)} | "
            f"{median(v.other):.2f} |"
        )
    return "\n".join(lines + stage_table(variants)) + "\n"


def stage_table(variants: list[Variant]) -> list[str]:
    """The service's own stages of a lone request (its stage histogram, between the scrapes
    around each round's lone requests): where the one-at-a-time latency goes."""
    measured = [v for v in variants if v.stages]
    if not measured:
        return []
    lines = [
        "",
        "The service's stages of a lone request, mean ms per request (medians over the rounds; "
        "`total` is from the delivery to the ack; the client's p50 above adds the broker both "
        "ways):",
        "",
        "| variant | " + " | ".join(STAGES) + " |",
        "|---|" + "---:|" * len(STAGES),
    ]
    for v in measured:
        cells = [f"{median([r.get(stage, 0.0) for r in v.stages]):.2f}" for stage in STAGES]
        lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("variants", nargs="+", type=Variant.parse, metavar="NAME=SOURCE")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--count", type=int, default=2000, help="requests per burst (2000)")
    parser.add_argument("--solo", type=int, default=100, help="lone requests per round (100)")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up burst (300)")
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument(
        "--payload",
        choices=sorted(PAYLOADS),
        default="small",
        help="small (no model, the default) or reference (4 MB, trains a model: use a --count "
        "of about 16, --solo 0, --warmup 2, and DEPLOYFLAG_WORKERS=1 variants for the scaling)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help=f"the table (default {OUT})")
    args = parser.parse_args(argv)
    if len(args.variants) < 2 or args.rounds < 1:
        parser.error("at least two variants and one round")
    if len({v.name for v in args.variants}) != len(args.variants):
        parser.error("variant names must differ")
    install_signal_cleanup()
    work = Path(tempfile.mkdtemp(prefix="deployflag-ab-"))
    started = time.monotonic()
    try:
        for v in args.variants:
            if v.ref == ".":
                v.src, v.source = None, "the working tree"
            else:
                (work / v.name).mkdir()
                v.src, v.source = export_ref(v.ref, work / v.name)
            if v.env:
                v.source += ", " + ", ".join(f"`{k}={val}`" for k, val in v.env.items())
        asyncio.run(run(args, args.variants, work))
    finally:
        Proc.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, args.variants, (time.monotonic() - started) / 60)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
