"""End-to-end service benchmark: `deployflag serve` against a Celery worker, over RabbitMQ.

    python benchmarks/bench_service.py [--quick] [--repeats N] [--only PART ...] [--src DIR]

Parts (docs/benchmarks.md says what each measures and why):

1. overhead  — small requests that train no model: serve vs Celery as the original ran it
               (max_tasks_per_child=1) vs Celery well-configured vs the raw broker path.
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
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

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
    RssSampler,
    Run,
    install_signal_cleanup,
    median,
    percentile,
    rabbitmq_version,
    start_celery,
    start_raw,
    start_service,
    vhost,
    wait_broker,
    wait_quiet,
)

TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
RESULTS = BENCH_DIR / "results"
PARTS = ("overhead", "reference", "large", "long")
MB = 1024 * 1024


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
    prefetch_knob: int = 8  # the documented DEPLOYFLAG_PREFETCH knob (4 × workers), in part 1

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


# --- payloads ----------------------------------------------------------------------------------


def small_payload() -> bytes:
    """The worked example of SPEC §4.5: 1.6 kB, one label class, so no model is trained."""
    return (ROOT / "examples" / "worked-example.json").read_bytes()


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
                poller or contextlib.nullcontext(),
                prober or contextlib.nullcontext(),
            ):
                run = await driver.burst(make, count, timeout_for(count, slowest_rate))
            proc.check()
            row.add_burst(run)
            row.note("other_load", other.cores)
            text = (
                f"  {row.system[:44]:<44} {row.workers} w, batch {i + 1}: "
                f"{run.throughput:8.2f} req/s  p50 {run.p(50) * 1e3:8.1f} ms  "
                f"p95 {run.p(95) * 1e3:8.1f} ms  other load {other.cores:.2f} cores"
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


async def run_service(
    url: str,
    work: Path,
    res: Results,
    row: Row,
    payload: bytes,
    *,
    count: int,
    solo: int,
    warmup: int,
    slowest_rate: float,
    prefetch: int | None = None,
    health: bool = False,
) -> None:
    names = Names()
    tag = f"svc-{row.part}-{row.workers}w-{prefetch or 'default'}-{names.suffix}"

    async def body() -> None:
        proc, port = start_service(
            url, names, work, workers=row.workers, prefetch=prefetch, src=res.src, tag=tag
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
                stages=res.stages,
                health=health,
            )

    await attempt(url, res, row, body)


async def run_celery(
    url: str,
    work: Path,
    res: Results,
    row: Row,
    payload: bytes,
    *,
    original: bool,
    count: int,
    solo: int,
    warmup: int,
    slowest_rate: float,
) -> None:
    async def body() -> None:
        names = Names()
        tag = f"celery-{row.part}-{row.workers}-{'orig' if original else 'good'}-{names.suffix}"
        proc = start_celery(
            url, names, work, concurrency=row.workers, original=original, src=res.src, tag=tag
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
            )

    await attempt(url, res, row, body)


# --- part 1: overhead on small requests ----------------------------------------------------------

SERVE_DEFAULT = "deployflag serve (prefetch = workers, default)"
CELERY_ORIGINAL = "Celery as the original (max_tasks_per_child=1, prefetch ×1)"
CELERY_GOOD = "Celery well-configured (prefork, defaults)"
RAW = "raw aio-pika consume → reply → ack (ceiling)"


async def part_overhead(url: str, work: Path, res: Results) -> None:
    plan = res.plan
    payload = small_payload()
    log(f"part 1: small requests ({len(payload)} B, no model), 2 workers / concurrency 2")
    common = {"count": plan.small, "solo": plan.solo, "warmup": plan.warmup}
    await run_service(
        url, work, res, res.row("overhead", SERVE_DEFAULT, 2), payload, slowest_rate=5, **common
    )
    knob = f"deployflag serve (prefetch {plan.prefetch_knob})"
    await run_service(
        url,
        work,
        res,
        res.row("overhead", knob, 2),
        payload,
        prefetch=plan.prefetch_knob,
        slowest_rate=5,
        **common,
    )
    await run_celery(
        url,
        work,
        res,
        res.row("overhead", CELERY_ORIGINAL, 2),
        payload,
        original=True,
        count=plan.small_original,
        solo=plan.solo_original,
        warmup=4,
        slowest_rate=2,
    )
    await run_celery(
        url,
        work,
        res,
        res.row("overhead", CELERY_GOOD, 2),
        payload,
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
        await run_service(
            url,
            work,
            res,
            res.row("reference", "deployflag serve", workers),
            payload,
            count=plan.reference,
            solo=0,
            warmup=workers,
            slowest_rate=0.1,
            health=True,
        )
    for concurrency, original in ((1, False), (2, False), (2, True)):
        label = CELERY_ORIGINAL if original else CELERY_GOOD
        await run_celery(
            url,
            work,
            res,
            res.row("reference", label, concurrency),
            payload,
            original=original,
            count=plan.reference,
            solo=0,
            warmup=concurrency,
            slowest_rate=0.1,
        )


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

    overhead = [r for r in res.rows if r.part == "overhead"]
    if overhead:
        add(
            f"## 1. Small requests, no model ({plan.small} per batch; Celery as the original: "
            f"{plan.small_original}; one at a time: {plan.solo} / {plan.solo_original})\n"
        )
        add(
            "| system | conc. | req/s (range) | burst p50 ms | burst p95 ms | one at a time p50 ms "
            "| one at a time p95 ms | loop lag p99 / max ms | other load |"
        )
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in overhead:
            add(
                f"| {r.system} | {r.workers} | {spread(r)} | {ms(r.m('p50'))} | "
                f"{ms(r.m('p95'))} | {ms(r.m('solo_p50'))} | {ms(r.m('solo_p95'))} | "
                f"{lag(r)} | {fmt(r.m('other_load'), 2)} |"
            )
        add("")

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
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, DBs)")
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
    parts = list(args.only or PARTS)
    install_signal_cleanup()
    work = Path(tempfile.mkdtemp(prefix="deployflag-bench-"))
    res = Results(plan, command=" ".join(argv if argv is not None else sys.argv[1:]))
    res.quiet_wait = args.quiet_wait
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
        with vhost() as url:
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
