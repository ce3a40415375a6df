"""End-to-end service benchmark: `deployflag serve` against a Celery worker, over RabbitMQ.

    python benchmarks/bench_service.py [--quick] [--repeats N] [--only PART ...] [--src DIR]

Parts (docs/benchmarks.md says what each measures and why):

1. overhead  — small requests that train no model (the worked example without its fixes):
               serve vs Celery as the original ran it (max_tasks_per_child=1) vs Celery
               well-configured vs the raw broker path.
1b. postgres — part 1's serve (default) and Celery well-configured with PostgreSQL as the store
               (one throwaway cluster, a fresh database each).
2. reference — generate("reference") payloads that train a model: 1 vs 2 workers, vs Celery.
3. (lag)     — event-loop lag and /healthz latency, measured during part 2's 2-worker run and
               part 1's service run.
4. large     — generate("large") payloads one at a time: seconds end to end, peak RSS.
5. long      — 10,000 small requests: throughput per 1,000-reply window and RSS growth.

Every figure is the median over ``--repeats`` batches (3 by default; the long run is one batch
read in windows). Results: a markdown table on stdout and in benchmarks/results/service.md, and
benchmarks/results/throughput.png. ``--src DIR`` runs the service and the Celery baseline from a
scratch copy of the package (e.g. a proposed patch) instead of the installed one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import aio_pika
import orjson

from deployflag.submit import celery_message
from deployflag.synthetic import generate
from harness import (
    BENCH_DIR,
    ROOT,
    BrokerTrouble,
    Driver,
    ForeignLoad,
    HealthProber,
    MetricsPoller,
    Names,
    Proc,
    ProcessCpu,
    RssSampler,
    bench_vhost,
    install_signal_cleanup,
    median,
    percentile,
    rabbitmq_version,
    start_celery,
    start_raw,
    start_service,
    wait_broker,
    wait_quiet,
)
from service_report import (
    CELERY_GOOD,
    CELERY_ORIGINAL,
    RAW,
    SERVE_DEFAULT,
    SERVE_FIXED,
    Plan,
    Results,
    Row,
    plot,
    report,
)

TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
RESULTS = BENCH_DIR / "results"
PARTS = ("overhead", "postgres", "reference", "large", "long")
MB = 1024 * 1024
NO_BURST = {"DEPLOYFLAG_BURST_PREFETCH": "0"}  # a fixed window: the prefetch alone


# --- payloads ----------------------------------------------------------------------------------


def small_payload() -> bytes:
    """The worked example (examples/worked-example.json, 1.6 kB) with every fix taken out: the
    counts only grow and nothing is resolved, so there is one label class and no model under
    either scoring. (The worked example itself has fixes: forecast scoring trains a 5-row model
    on it, ~4 ms of a worker's CPU, which would measure scikit-learn rather than the overhead.)"""
    request = orjson.loads((ROOT / "examples" / "worked-example.json").read_bytes())
    for i, row in enumerate(request["analysis_run"]):
        row["frequency_detected"], row["frequency_resolved"] = 5 + 2 * i, 0
    for i, row in enumerate(request["historical_run"]):
        row["frequency"] = 10 + i
    body = orjson.dumps(request)
    check_untrained(body)
    return body


def check_untrained(body: bytes) -> None:
    """Stop if the overhead payload trains a model at the default settings (a scoring change
    would otherwise turn part 1 into a training benchmark without anybody noticing)."""
    from deployflag.messages import parse_request
    from deployflag.pipeline import compute
    from deployflag.settings import Settings

    model = compute(parse_request(body), Settings().pipeline_config()).model
    if model.trained:
        raise SystemExit("the overhead payload trains a model: fix small_payload()")


def factory(payload: bytes) -> Callable[[str], aio_pika.Message]:
    """Celery protocol-2 task messages, as the upstream sends them; the id is the task id."""
    return lambda rid: celery_message(payload, TRAINING_TASK, rid)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- runner helpers ----------------------------------------------------------------------------


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    except BaseException:
        log(f"--- {proc.name} log tail ---\n{proc.log_tail()}")
        raise
    finally:
        proc.stop()


def timeout_for(count: int, slowest_rate: float) -> float:
    return 120.0 + count / slowest_rate


async def attempt(
    url: str, res: Results, row: Row, body: Callable[[], Awaitable[None]], tries: int = 3
) -> None:
    """Run one configuration (fresh processes, fresh queues); run it again from scratch when
    the shared broker went away under it, and give up on it after ``tries``."""
    label = f"{row.part}: {row.system} ({row.workers})"
    for i in range(1, tries + 1):
        if res.quiet_wait > 0:
            load = await asyncio.to_thread(wait_quiet, res.quiet_wait)
            if load >= 0.25:
                log(f"  other load still {load:.2f} cores after {res.quiet_wait:g} s: going on")
        try:
            await body()
            return
        except (KeyboardInterrupt, asyncio.CancelledError):
            raise
        except Exception as exc:  # broker restarts surface as several aio-pika/aiormq types
            row.reset()
            note = f"{label}: try {i} failed: {type(exc).__name__}: {str(exc)[:200]}"
            log("  " + note)
            res.retries.append(note)
            with contextlib.suppress(BrokerTrouble):
                await wait_broker(url)
    res.failures.append(f"{label}: gave up after {tries} tries")


async def batches(
    url: str,
    names: Names,
    proc: Proc,
    row: Row,
    plan: Plan,
    payload: bytes,
    *,
    count: int,
    solo: int,
    warmup: int,
    slowest_rate: float,
    port: int | None = None,
    stages: dict[str, dict[str, float]] | None = None,
    health: bool = False,
) -> None:
    """Warm up, then ``plan.repeats`` batches: a burst of ``count`` requests (throughput, burst
    latency; with ``port``, the service's loop lag and stage times; with ``health``, /healthz
    latency), then ``solo`` requests one at a time (latency without queueing)."""
    make = factory(payload)
    async with Driver(url, names) as driver:
        await driver.wait_consumer(proc)
        if warmup:
            await driver.burst(make, warmup, timeout_for(warmup, slowest_rate))
        for i in range(plan.repeats):
            poller = MetricsPoller(port) if port is not None else None
            prober = HealthProber(port) if health and port is not None else None
            with (
                ForeignLoad() as other,
                ProcessCpu(proc.pid) as cpu,
                poller or contextlib.nullcontext(),
                prober or contextlib.nullcontext(),
            ):
                run = await driver.burst(make, count, timeout_for(count, slowest_rate))
            proc.check()
            row.add_burst(run)
            row.note("other_load", other.cores)
            row.note("cpu_main_ms", 1e3 * cpu.main / count)
            row.note("cpu_children_ms", 1e3 * cpu.children / count)
            text = (
                f"  {row.system[:44]:<44} {row.workers} w, batch {i + 1}: "
                f"{run.throughput:8.2f} req/s  p50 {run.p(50) * 1e3:8.1f} ms  "
                f"p95 {run.p(95) * 1e3:8.1f} ms  other load {other.cores:.2f} cores  "
                f"CPU/req main {1e3 * cpu.main / count:.2f} ms, children "
                f"{1e3 * cpu.children / count:.2f} ms"
            )
            if poller is not None:
                row.note("lag_p99", poller.lag_quantile(0.99))
                row.note("lag_max", poller.lag_max())
                row.note("lag_max_bound", float(poller.lag_max_is_bound))
                text += (
                    f"  loop lag p99 {poller.lag_quantile(0.99) * 1e3:.1f} ms "
                    f"max {poller.lag_max() * 1e3:.1f} ms"
                )
                if stages is not None and i == 0:
                    stages[f"{row.part}: {row.system} ({row.workers} w)"] = poller.stage_means()
            if prober is not None:
                row.note("healthz_p50", percentile(prober.latencies, 50))
                row.note("healthz_p99", percentile(prober.latencies, 99))
                row.note("healthz_max", max(prober.latencies, default=float("nan")))
                row.note("healthz_failures", prober.failures)
                text += f"  /healthz p99 {percentile(prober.latencies, 99) * 1e3:.1f} ms"
            if solo:
                row.add_solo(await driver.one_by_one(make, solo, timeout_for(1, 0.05)))
                text += f"  one-at-a-time p50 {row.solo_p50[-1] * 1e3:.1f} ms"
            log(text)


async def run_system(
    url: str,
    work: Path,
    res: Results,
    row: Row,
    payload: bytes,
    *,
    system: Literal["service", "celery"],
    count: int,
    solo: int,
    warmup: int,
    slowest_rate: float,
    prefetch: int | None = None,
    original: bool = False,
    health: bool = False,
    db_url: Callable[[], str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> None:
    """One configuration of ``deployflag serve`` or of the Celery baseline (``original``: as
    the original ran it), measured in ``plan.repeats`` batches on fresh queues."""

    async def body() -> None:
        names = Names()
        port: int | None = None
        if system == "service":
            tag = f"svc-{row.part}-{row.workers}w-{prefetch or 'default'}-{names.suffix}"
            proc, port = start_service(
                url,
                names,
                work,
                workers=row.workers,
                prefetch=prefetch,
                src=res.src,
                tag=tag,
                db_url=db_url() if db_url else None,
                extra_env=extra_env,
            )
        else:
            flavour = "orig" if original else "good"
            tag = f"celery-{row.part}-{row.workers}-{flavour}-{names.suffix}"
            proc = start_celery(
                url,
                names,
                work,
                concurrency=row.workers,
                original=original,
                src=res.src,
                tag=tag,
                db_url=db_url() if db_url else None,
            )
        with running(proc):
            await batches(
                url,
                names,
                proc,
                row,
                res.plan,
                payload,
                count=count,
                solo=solo,
                warmup=warmup,
                slowest_rate=slowest_rate,
                port=port,
                stages=res.stages if port is not None else None,
                health=health,
            )

    await attempt(url, res, row, body)


# --- part 1: overhead on small requests ----------------------------------------------------------


async def part_overhead(url: str, work: Path, res: Results) -> None:
    plan = res.plan
    payload = small_payload()
    log(f"part 1: small requests ({len(payload)} B, no model), 2 workers / concurrency 2")
    common: dict[str, Any] = {"count": plan.small, "solo": plan.solo, "warmup": plan.warmup}
    await run_system(
        url,
        work,
        res,
        res.row("overhead", SERVE_DEFAULT, 2),
        payload,
        system="service",
        slowest_rate=5,
        **common,
    )
    # Fixed windows (no burst consumer): the former default, and the knob.
    knob = f"deployflag serve (fixed prefetch {plan.prefetch_knob}, no burst window)"
    for label, prefetch in ((SERVE_FIXED, None), (knob, plan.prefetch_knob)):
        await run_system(
            url,
            work,
            res,
            res.row("overhead", label, 2),
            payload,
            system="service",
            prefetch=prefetch,
            extra_env=NO_BURST,
            slowest_rate=5,
            **common,
        )
    if not res.skip_original:
        await run_system(
            url,
            work,
            res,
            res.row("overhead", CELERY_ORIGINAL, 2),
            payload,
            system="celery",
            original=True,
            count=plan.small_original,
            solo=plan.solo_original,
            warmup=4,
            slowest_rate=2,
        )
    await run_system(
        url,
        work,
        res,
        res.row("overhead", CELERY_GOOD, 2),
        payload,
        system="celery",
        original=False,
        slowest_rate=5,
        **common,
    )

    row = res.row("overhead", RAW, 1)

    async def raw() -> None:
        names = Names()
        with running(start_raw(url, names, work, prefetch=64)) as proc:
            await batches(url, names, proc, row, plan, payload, slowest_rate=50, **common)

    await attempt(url, res, row, raw)


# --- parts 2 and 3: reference payloads, scaling, loop lag, /healthz ------------------------------


async def part_reference(url: str, work: Path, res: Results) -> None:
    plan = res.plan
    payload = orjson.dumps(generate("reference", seed=1))
    log(f"part 2/3: reference payloads ({len(payload) / MB:.1f} MB, trains a model)")
    for workers in (1, 2):
        await run_system(
            url,
            work,
            res,
            res.row("reference", "deployflag serve", workers),
            payload,
            system="service",
            count=plan.reference,
            solo=0,
            warmup=workers,
            slowest_rate=0.1,
            health=True,
        )
    celeries = [(1, False), (2, False)] + ([] if res.skip_original else [(2, True)])
    for concurrency, original in celeries:
        label = CELERY_ORIGINAL if original else CELERY_GOOD
        await run_system(
            url,
            work,
            res,
            res.row("reference", label, concurrency),
            payload,
            system="celery",
            original=original,
            count=plan.reference,
            solo=0,
            warmup=concurrency,
            slowest_rate=0.1,
        )


# --- part 1 again, on PostgreSQL -----------------------------------------------------------------


def migrate_database(db_url: str, src: Path | None, cwd: Path) -> None:
    """``deployflag migrate`` on a fresh PostgreSQL database, with the code that will use it."""
    env = {**os.environ, "DEPLOYFLAG_DATABASE_URL": db_url}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    subprocess.run(
        [sys.executable, "-m", "deployflag", "migrate"],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
    )


async def part_postgres(url: str, work: Path, res: Results) -> None:
    """Part 1's serve (default) and Celery well-configured, each on a fresh database of one
    throwaway PostgreSQL cluster (tests/support/postgres.py: fsync off, as for the tests)."""
    sys.path.insert(0, str(ROOT))
    from tests.support.postgres import PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        res.failures.append("postgres: no PostgreSQL server binaries")
        return
    cluster = PostgresCluster(bindir)
    await asyncio.to_thread(cluster.setup)
    try:
        plan = res.plan
        payload = small_payload()
        log(f"part 1 on PostgreSQL {bindir.parent.name}: small requests, 2 workers / concurrency 2")
        made = itertools.count()

        def fresh() -> str:
            db = cluster.fresh_database(f"bench_{next(made)}")
            migrate_database(db, res.src, work)
            return db

        common: dict[str, Any] = {"count": plan.small, "solo": plan.solo, "warmup": plan.warmup}
        for label, system in ((SERVE_DEFAULT, "service"), (CELERY_GOOD, "celery")):
            await run_system(
                url,
                work,
                res,
                res.row("postgres", label, 2),
                payload,
                system=system,  # type: ignore[arg-type]
                slowest_rate=5,
                db_url=fresh,
                **common,
            )
    finally:
        await asyncio.to_thread(cluster.close)


# --- part 4: large payloads --------------------------------------------------------------------


async def part_large(url: str, work: Path, res: Results) -> None:
    plan = res.plan
    payload = orjson.dumps(generate("large", seed=1))
    make = factory(payload)
    log(f"part 4: large payloads ({len(payload) / MB:.1f} MB), one at a time")
    row = res.row("large", "deployflag serve", 2)

    async def service() -> None:
        names = Names()
        proc, port = start_service(
            url, names, work, workers=2, src=res.src, tag=f"svc-large-{names.suffix}"
        )
        with running(proc):
            async with Driver(url, names) as driver:
                row.note("rss_idle_service", RssSampler(proc.pid).sample()[0] / MB)
                for i in range(plan.large_repeats):
                    with RssSampler(proc.pid) as rss, MetricsPoller(port) as poller:
                        run = await driver.one_by_one(make, 1, timeout_for(1, 0.01))
                    proc.check()
                    row.throughput.append(run.throughput)
                    row.note("seconds", run.seconds)
                    row.note("rss_main", rss.peak_root / MB)
                    row.note("rss_worker", rss.peak_child / MB)
                    row.note("lag_max", poller.lag_max())
                    row.note("lag_max_bound", float(poller.lag_max_is_bound))
                    log(
                        f"  serve large {i + 1}: {run.seconds:.2f} s, peak RSS service "
                        f"{rss.peak_root / MB:.0f} MB, worker {rss.peak_child / MB:.0f} MB, "
                        f"loop lag max {poller.lag_max() * 1e3:.0f} ms"
                    )

    await attempt(url, res, row, service)
    row = res.row("large", CELERY_GOOD, 2)

    async def celery() -> None:
        names = Names()
        proc = start_celery(
            url,
            names,
            work,
            concurrency=2,
            original=False,
            src=res.src,
            tag=f"celery-large-{names.suffix}",
        )
        with running(proc):
            async with Driver(url, names) as driver:
                await driver.wait_consumer(proc)
                for i in range(plan.large_repeats):
                    with RssSampler(proc.pid) as rss:
                        run = await driver.one_by_one(make, 1, timeout_for(1, 0.01))
                    proc.check()
                    row.throughput.append(run.throughput)
                    row.note("seconds", run.seconds)
                    row.note("rss_main", rss.peak_root / MB)
                    row.note("rss_worker", rss.peak_child / MB)
                    log(
                        f"  celery large {i + 1}: {run.seconds:.2f} s, peak RSS parent "
                        f"{rss.peak_root / MB:.0f} MB, child {rss.peak_child / MB:.0f} MB"
                    )

    await attempt(url, res, row, celery)


# --- part 5: the long run ----------------------------------------------------------------------


async def part_long(url: str, work: Path, res: Results) -> None:
    plan = res.plan
    payload = small_payload()
    log(f"part 5: long run, {plan.long} small requests")
    row = res.row("long", "deployflag serve", 2)

    async def body() -> None:
        names = Names()
        proc, port = start_service(
            url, names, work, workers=2, src=res.src, tag=f"svc-long-{names.suffix}"
        )
        with running(proc):
            async with Driver(url, names) as driver:
                await driver.burst(factory(payload), plan.warmup, 120)
                with (
                    RssSampler(proc.pid, every=0.2) as rss,
                    MetricsPoller(port) as poller,
                    ForeignLoad() as other,
                ):
                    started = rss.sample()[0]
                    run = await driver.burst(factory(payload), plan.long, timeout_for(plan.long, 5))
            row.add_burst(run)
            row.note("other_load", other.cores)
            row.note("lag_p99", poller.lag_quantile(0.99))
            row.note("lag_max", poller.lag_max())
        res.long_windows = run.windows(plan.window)
        times = sorted(run.received.values())
        after_first = rss.root_at(times[plan.window - 1])
        final = rss.root_at(times[-1])
        res.long_rss = {
            "start_mb": started / MB,
            "after_first_window_mb": after_first / MB,
            "end_mb": final / MB,
            "peak_mb": rss.peak_root / MB,
            "growth_pct": 100 * (final - after_first) / after_first,
            "worker_peak_mb": rss.peak_child / MB,
        }
        log(f"  windows (req/s): {[round(w) for w in res.long_windows]}")
        log(f"  RSS: { {k: round(v, 1) for k, v in res.long_rss.items()} }")

    await attempt(url, res, row, body)


# --- report ------------------------------------------------------------------------------------


def fsync_ms(directory: Path, count: int = 30) -> float:
    """Median fsync latency of a 4 kB write in ``directory``: SQLite pays it at every commit
    (synchronous=FULL); on this VM it ranges from 0.1 ms to 10 ms with other disk traffic."""
    path = directory / "fsync-probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return median(times) * 1e3


def machine(work: Path) -> dict[str, str]:
    import sqlite3

    import celery

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "rabbitmq": rabbitmq_version(),
        "celery": celery.__version__,
        "sqlite": sqlite3.sqlite_version,
        "kernel": platform.release(),
        "fsync": f"{fsync_ms(work):.2f}",
        "load": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def export_ref(ref: str, work: Path) -> tuple[Path, str]:
    """``git archive REF src migrations alembic.ini`` into the work dir: a frozen copy of the
    service, untouched by edits in the working tree while the bench runs."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    tree = work / f"src-{commit}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", ref, "src", "migrations", "alembic.ini"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree / "src", f"commit {commit} (`--ref {ref}`)"


def describe_tree() -> str:
    done = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return f"the working tree ({done.stdout.strip() or 'unknown'})"


async def run_parts(url: str, work: Path, res: Results, parts: list[str]) -> None:
    steps: dict[str, Callable[[str, Path, Results], Awaitable[None]]] = {
        "overhead": part_overhead,
        "postgres": part_postgres,
        "reference": part_reference,
        "large": part_large,
        "long": part_long,
    }
    for part in parts:
        await steps[part](url, work, res)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one large run")
    parser.add_argument("--repeats", type=int, default=3, help="batches per figure (default 3)")
    parser.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", type=Path, help="run this copy of src/ (e.g. with a patch)")
    source.add_argument("--ref", help="run this git commit of src/ (e.g. HEAD), frozen")
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="where service.md and throughput.png go"
    )
    parser.add_argument("--json", type=Path, help="also write every batch's figures here")
    parser.add_argument(
        "--prefetch-knob",
        type=int,
        default=8,
        help="the second serve row of part 1 runs with this DEPLOYFLAG_PREFETCH (default 8)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, DBs)")
    parser.add_argument(
        "--skip-original",
        action="store_true",
        help="leave out Celery as the original ran it (slow on a busy machine)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each configuration, wait up to this many seconds for other processes to "
        "use less than 0.25 cores (default 30; 0: do not wait)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    plan = Plan.quick(args.repeats) if args.quick else Plan.full(args.repeats)
    plan = dataclasses.replace(plan, prefetch_knob=args.prefetch_knob)
    parts = list(args.only or PARTS)
    install_signal_cleanup()
    work = Path(tempfile.mkdtemp(prefix="deployflag-bench-"))
    res = Results(plan, command=" ".join(argv if argv is not None else sys.argv[1:]))
    res.quiet_wait = args.quiet_wait
    res.skip_original = args.skip_original
    if args.ref:
        res.src, res.source = export_ref(args.ref, work)
    elif args.src:
        res.src, res.source = args.src.resolve(), f"`{args.src}`"
    else:
        res.source = describe_tree()
    res.machine = machine(work)
    log(f"work dir {work}; {res.source}; {plan}")
    started = time.monotonic()
    try:
        with bench_vhost() as url:
            asyncio.run(run_parts(url, work, res, parts))
    finally:
        Proc.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    text = report(res, elapsed)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "service.md").write_text(text)
    plot(res, args.out / "throughput.png")
    if args.json:
        dump = {
            "rows": [r.__dict__ for r in res.rows],
            "stages": res.stages,
            "long_windows": res.long_windows,
            "long_rss": res.long_rss,
            "machine": res.machine,
            "retries": res.retries,
            "failures": res.failures,
        }
        args.json.write_text(json.dumps(dump, indent=1))
    log(f"done in {elapsed / 60:.1f} min: {args.out / 'service.md'}, {args.out / 'throughput.png'}")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
