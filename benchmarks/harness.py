"""Plumbing for bench_service.py: a vhost per run, processes that are always cleaned up, a load
driver that timestamps every request and matches replies by correlation id, and samplers (RSS,
/healthz latency, /metrics).

Every process started here runs in a session of its own and is stopped by its process-group id
(SIGTERM, then SIGKILL), so a failed run leaves no Celery worker or service behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import os
import signal
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import psutil

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, a benchmark has only benchmarks/ on its path; the helpers it shares with the
# tests live in tests/support.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from tests.support.toolkit import (  # noqa: E402
    Names,
    Proc,
    Samples,
    free_port,
    rabbitmqctl,
    read_metrics,
    vhost,
    wait_until,
)

RABBIT = "127.0.0.1:5672"
BENCH_DIR = Path(__file__).resolve().parent


# --- small utilities ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- RabbitMQ: one vhost per bench run, fresh names per configuration --------------------------


def rabbitmq_version() -> str:
    try:
        out = rabbitmqctl("version").strip()
    except RuntimeError:
        return "unknown"
    return out or "unknown"


def bench_vhost() -> contextlib.AbstractContextManager[str]:
    """An AMQP URL on a vhost of this run's own, deleted afterwards (whatever happened)."""
    return vhost("deployflag-bench", RABBIT)


# --- processes ---------------------------------------------------------------------------------


def clean_env(src: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for a child: no inherited DEPLOYFLAG_*, one BLAS thread per process,
    and ``src`` (a scratch copy of the package) ahead of the installed one when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYFLAG_")}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    paths = [str(BENCH_DIR)]
    if src is not None:
        paths.insert(0, str(src))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def install_signal_cleanup() -> None:
    """SIGTERM/SIGHUP end the bench like Ctrl-C does, so every ``finally`` runs."""

    def _raise(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise)


def start_service(
    url: str,
    names: Names,
    workdir: Path,
    *,
    workers: int,
    prefetch: int | None = None,
    src: Path | None = None,
    tag: str = "service",
    extra_env: dict[str, str] | None = None,
    db_url: str | None = None,
) -> tuple[Proc, int]:
    """`python -m deployflag serve` with SQLite (or ``db_url``), its own names and port; waits
    until ready."""
    port = free_port()
    env = clean_env(
        src,
        **names.env(),
        DEPLOYFLAG_AMQP_URL=url,
        DEPLOYFLAG_DATABASE_URL=db_url or f"sqlite+aiosqlite:///{workdir / (tag + '.db')}",
        DEPLOYFLAG_HTTP_PORT=str(port),
        DEPLOYFLAG_WORKERS=str(workers),
        DEPLOYFLAG_LOG_LEVEL="WARNING",
        DEPLOYFLAG_LOG_FORMAT="json",
        DEPLOYFLAG_REPLY_FORMAT="json",  # the same JSON reply as the Celery baseline publishes
        DEPLOYFLAG_DRAIN_TIMEOUT="10",
    )
    if prefetch is not None:
        env["DEPLOYFLAG_PREFETCH"] = str(prefetch)
    env.update(extra_env or {})
    proc = Proc(
        tag,
        [sys.executable, "-m", "deployflag", "serve"],
        env,
        workdir / f"{tag}.log",
        cwd=workdir,  # no .env from the repository is read
    )
    try:
        wait_until(lambda: proc.check() or _ready(port), 90, f"{tag} to become ready", every=0.2)
    except BaseException:
        proc.stop()
        raise
    return proc, port


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def start_celery(
    url: str,
    names: Names,
    workdir: Path,
    *,
    concurrency: int,
    original: bool,
    src: Path | None = None,
    tag: str = "celery",
    db_url: str | None = None,
) -> Proc:
    """The Celery baseline (celery_baseline.py): prefork, ``concurrency`` children, acks_late.

    ``original``: ``worker_prefetch_multiplier=1`` and ``max_tasks_per_child=1``, as the original
    ran; otherwise the defaults (prefetch multiplier 4, children live on).
    """
    env = clean_env(
        src,
        BENCH_AMQP_URL=url,
        BENCH_EXCHANGE=names.exchange,
        BENCH_TRAINING_QUEUE=names.training,
        BENCH_RESULT_QUEUE=names.result,
        BENCH_DATABASE_URL=db_url or f"sqlite+aiosqlite:///{workdir / (tag + '.db')}",
    )
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "celery_baseline",
        "worker",
        "-Q",
        names.training,
        "--pool",
        "prefork",
        "--concurrency",
        str(concurrency),
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        "WARNING",
        "-n",
        f"{tag}-{names.suffix}@%h",
    ]
    if original:
        argv += ["--prefetch-multiplier", "1", "--max-tasks-per-child", "1"]
    proc = Proc(tag, argv, env, workdir / f"{tag}.log", cwd=BENCH_DIR)
    return proc


def start_raw(url: str, names: Names, workdir: Path, *, prefetch: int) -> Proc:
    """raw_consumer.py: an aio-pika consumer that only replies (confirmed) and acks."""
    env = clean_env(
        None,
        BENCH_AMQP_URL=url,
        BENCH_EXCHANGE=names.exchange,
        BENCH_TRAINING_QUEUE=names.training,
        BENCH_RESULT_QUEUE=names.result,
        BENCH_PREFETCH=str(prefetch),
    )
    return Proc(
        "raw",
        [sys.executable, str(BENCH_DIR / "raw_consumer.py")],
        env,
        workdir / "raw.log",
        cwd=BENCH_DIR,
    )


# --- the load driver ---------------------------------------------------------------------------


@dataclass
class Run:
    """One batch: when each request was published and when its reply arrived (perf_counter)."""

    sent: dict[str, float]
    received: dict[str, float]

    @property
    def count(self) -> int:
        return len(self.received)

    @property
    def seconds(self) -> float:
        return max(self.received.values()) - min(self.sent.values())

    @property
    def throughput(self) -> float:
        return self.count / self.seconds

    def latencies(self) -> list[float]:
        return [self.received[k] - self.sent[k] for k in self.received if k in self.sent]

    def p(self, q: float) -> float:
        return percentile(self.latencies(), q)

    def windows(self, size: int) -> list[float]:
        """Throughput of each consecutive ``size`` replies (the first from the first publish)."""
        times = sorted(self.received.values())
        edges = [min(self.sent.values())] + [
            times[i - 1] for i in range(size, len(times) + 1, size)
        ]
        return [size / (b - a) for a, b in itertools.pairwise(edges) if b > a]


MessageFactory = Callable[[str], aio_pika.Message]


class BrokerTrouble(Exception):
    """The broker closed the bench's connection (someone restarted it?) or replies stopped
    coming: this batch's figures are void; the configuration is run again."""


async def wait_broker(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=5)
        except Exception as exc:  # aio-pika raises several kinds while a broker restarts
            if time.monotonic() > deadline:
                raise BrokerTrouble(f"broker unreachable for {timeout:g} s: {exc}") from None
            await asyncio.sleep(2)
        else:
            await connection.close()
            return


class Driver:
    """Publishes requests on the training queue and collects replies from the result queue.

    Both queues are declared here (durable, no arguments, bound with their own names as routing
    keys, as the service declares them), so nothing is lost if the consumer is still starting.
    """

    def __init__(self, url: str, names: Names) -> None:
        self.url = url
        self.names = names
        self._waiters: dict[str, asyncio.Future[float]] = {}
        self._received: dict[str, float] = {}
        self._batch: set[str] = set()
        self._all: asyncio.Event | None = None
        self._lost: asyncio.Event = asyncio.Event()
        self._lost_reason = ""

    async def __aenter__(self) -> Driver:
        self.connection = await aio_pika.connect(self.url)
        self.connection.close_callbacks.add(self._on_close)
        self.publish_channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await self.publish_channel.declare_exchange(
            self.names.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for kind in ("collect_data", "training", "save_result", "failed"):
            queue = await self.publish_channel.declare_queue(self.names.queue(kind), durable=True)
            await queue.bind(self.exchange, routing_key=self.names.queue(kind))
        self.collect_channel = await self.connection.channel()
        await self.collect_channel.set_qos(prefetch_count=2000)
        result = await self.collect_channel.get_queue(self.names.result)
        await result.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 10)

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        self._lost_reason = str(exc) if exc else "connection closed"
        self._lost.set()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(BrokerTrouble(f"broker connection lost: {exc}"))

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        rid = message.correlation_id
        if rid is None:
            return
        waiter = self._waiters.pop(rid, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)
        if rid in self._batch:  # replies to an earlier, abandoned batch do not count
            self._received[rid] = now
            if self._all is not None and len(self._received) >= len(self._batch):
                self._all.set()

    async def consumers(self) -> int:
        queue = await self.publish_channel.declare_queue(self.names.training, passive=True)
        return int(queue.declaration_result.consumer_count or 0)

    async def wait_consumer(self, proc: Proc, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while await self.consumers() == 0:
            proc.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not start consuming within {timeout:g} s")
            await asyncio.sleep(0.1)

    async def burst(
        self,
        factory: MessageFactory,
        count: int,
        timeout: float,
        window: int = 256,
        stall: float = 90.0,
    ) -> Run:
        """Publish ``count`` requests as fast as confirms allow; wait for every reply.

        Raises :class:`BrokerTrouble` when the connection drops or no reply comes for ``stall``
        seconds, TimeoutError after ``timeout`` seconds in all."""
        ids = [str(uuid.uuid4()) for _ in range(count)]
        sent: dict[str, float] = {}
        self._received = {}
        self._batch = set(ids)
        self._all = asyncio.Event()
        limiter = asyncio.Semaphore(window)  # publishes awaiting their confirm at once

        async def one(rid: str) -> None:
            async with limiter:
                message = factory(rid)
                sent[rid] = time.perf_counter()
                await self.exchange.publish(
                    message, routing_key=self.names.training, mandatory=True
                )

        publishing = asyncio.gather(*(one(rid) for rid in ids))
        try:
            await self._wait_all(count, timeout, stall)
        finally:
            if self._lost.is_set():
                publishing.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await publishing
        received, self._received, self._all, self._batch = self._received, {}, None, set()
        return Run(sent=sent, received=received)

    async def _wait_all(self, count: int, timeout: float, stall: float) -> None:
        assert self._all is not None
        deadline = time.monotonic() + timeout
        seen, progress = -1, time.monotonic()
        while not self._all.is_set():
            if self._lost.is_set():
                raise BrokerTrouble(f"broker connection lost: {self._lost_reason}")
            now = time.monotonic()
            if len(self._received) != seen:
                seen, progress = len(self._received), now
            if now - progress > stall:
                raise BrokerTrouble(f"no reply for {stall:g} s ({seen} of {count})")
            if now > deadline:
                raise TimeoutError(f"{seen} of {count} replies after {timeout:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all.wait(), 0.5)

    async def one_by_one(self, factory: MessageFactory, count: int, timeout: float) -> Run:
        """Closed loop, one request in flight: latency without any queueing."""
        sent: dict[str, float] = {}
        received: dict[str, float] = {}
        self._received, self._all, self._batch = {}, None, set()
        loop = asyncio.get_running_loop()
        for _ in range(count):
            if self._lost.is_set():
                raise BrokerTrouble(f"broker connection lost: {self._lost_reason}")
            rid = str(uuid.uuid4())
            waiter: asyncio.Future[float] = loop.create_future()
            self._waiters[rid] = waiter
            message = factory(rid)
            sent[rid] = time.perf_counter()
            await self.exchange.publish(message, routing_key=self.names.training, mandatory=True)
            try:
                received[rid] = await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise BrokerTrouble(f"no reply within {timeout:g} s") from None
            finally:
                self._waiters.pop(rid, None)
        return Run(sent=sent, received=received)


# --- samplers ----------------------------------------------------------------------------------


class RssSampler:
    """Samples the RSS of a process and of its descendants every ``every`` seconds (a thread)."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.root = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (time, root RSS, largest child RSS)
        self.peak_root = 0
        self.peak_child = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def sample(self) -> tuple[int, int]:
        root = self.root.memory_info().rss
        child = 0
        for proc in self.root.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child = max(child, proc.memory_info().rss)
        return root, child

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                root, child = self.sample()
                self.samples.append((time.perf_counter(), root, child))
                self.peak_root = max(self.peak_root, root)
                self.peak_child = max(self.peak_child, child)
            self._stop.wait(self.every)

    def root_at(self, when: float) -> int:
        """The root's RSS at the last sample taken at or before ``when``."""
        value = self.samples[0][1] if self.samples else 0
        for t, root, _ in self.samples:
            if t > when:
                break
            value = root
        return value


class HealthProber:
    """GETs /healthz every ``every`` seconds from a thread (a new connection each time, as a
    health checker does) and records how long each answer took."""

    def __init__(self, port: int, every: float = 0.1) -> None:
        self.port = port
        self.every = every
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()
                conn.close()
                if response.status != 200:
                    self.failures += 1
                self.latencies.append(time.perf_counter() - started)
            except OSError:
                self.failures += 1
            self._stop.wait(max(0.0, self.every - (time.perf_counter() - started)))


def scrape(port: int) -> Samples:
    """/metrics as {sample name: {sorted labels: value}}; OSError when it does not answer."""
    samples = read_metrics(port)
    if samples is None:
        raise OSError(f"/metrics on port {port} did not answer")
    return samples


class MetricsPoller:
    """Scrapes /metrics before, every ``every`` seconds during, and after a run: the recent-max
    lag gauge covers about a minute, so polling it catches the maximum over any run."""

    def __init__(self, port: int, every: float = 1.0) -> None:
        self.port = port
        self.every = every
        self.before: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.after: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        self.max_lag = 0.0
        self.lag_max_is_bound = False  # lag_max() gave a histogram bucket's upper edge
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MetricsPoller:
        self.before = scrape(self.port)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.after = scrape(self.port)
        self._note(self.after)

    def _note(self, metrics: dict[str, dict[tuple[tuple[str, str], ...], float]]) -> None:
        for value in metrics.get("deployflag_event_loop_lag_max_seconds", {}).values():
            self.max_lag = max(self.max_lag, value)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(OSError):
                self._note(scrape(self.port))

    def lag_quantile(self, q: float) -> float:
        """Quantile of the loop-lag samples taken during the run, from the histogram's bucket
        counts (after − before), interpolated within a bucket as histogram_quantile() does.

        Never above :meth:`lag_max`: interpolating inside a wide bucket (5–10 ms) can land
        above the largest lag actually seen, and a p99 over the maximum reads as nonsense."""
        quantile = histogram_quantile(
            q,
            buckets(self.before, "deployflag_event_loop_lag_seconds_bucket", {}),
            buckets(self.after, "deployflag_event_loop_lag_seconds_bucket", {}),
        )
        return min(quantile, self.lag_max())

    def lag_max(self) -> float:
        """The largest lag during the run. The recent-max gauge is exact when it rose during the
        run; when it still shows an older, larger lag (start-up), the run's maximum is bounded
        by the upper edge of the highest histogram bucket that gained samples."""
        name = "deployflag_event_loop_lag_max_seconds"
        before = max(self.before.get(name, {}).values(), default=0.0)
        self.lag_max_is_bound = self.max_lag <= before
        if not self.lag_max_is_bound:
            return self.max_lag
        bucket = "deployflag_event_loop_lag_seconds_bucket"
        old, new = buckets(self.before, bucket, {}), buckets(self.after, bucket, {})
        samples = self.lag_samples()
        for bound in sorted(new):  # cumulative counts: the first bound that holds them all
            if samples > 0 and new[bound] - old.get(bound, 0.0) >= samples:
                return bound if bound != float("inf") else self.max_lag
        return float("nan")

    def lag_samples(self) -> int:
        name = "deployflag_event_loop_lag_seconds_count"
        return int(sum(self.after.get(name, {}).values()) - sum(self.before.get(name, {}).values()))

    def stage_means(self) -> dict[str, float]:
        """Mean seconds per request of each handler stage during the run."""
        means: dict[str, float] = {}
        for key, total in self.after.get("deployflag_stage_seconds_sum", {}).items():
            stage = dict(key).get("stage", "?")
            count = self.after["deployflag_stage_seconds_count"].get(key, 0.0)
            count -= self.before.get("deployflag_stage_seconds_count", {}).get(key, 0.0)
            total -= self.before.get("deployflag_stage_seconds_sum", {}).get(key, 0.0)
            if count > 0:
                means[stage] = total / count
        return means


def buckets(
    metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, labels: dict[str, str]
) -> dict[float, float]:
    """A histogram's cumulative buckets from scraped metrics: {upper bound: samples ≤ it}."""
    out: dict[float, float] = {}
    for key, value in metrics.get(name, {}).items():
        label = dict(key)
        if any(label.get(k) != v for k, v in labels.items()):
            continue
        out[float(label["le"])] = value
    return out


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            width = count - lower_count
            share = (rank - lower_count) / width if width > 0 else 0.0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return bounds[-1]


# --- other load on the machine -----------------------------------------------------------------

_NEUTRAL = frozenset({"beam.smp", "epmd", "erl_child_setup", "inet_gethost"})  # the broker


def _tree(pid: int) -> set[int]:
    try:
        root = psutil.Process(pid)
        return {pid} | {p.pid for p in root.children(recursive=True)}
    except psutil.Error:
        return {pid}


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            out[proc.pid] = (proc.info["name"] or "", times.user + times.system)
    return out


class ForeignLoad:
    """CPU used by processes that are neither this bench's (it and its descendants) nor the
    broker's, in cores (CPU-seconds per second) over the span: other people's work that competes
    with the benchmark for the same cores. Processes that start and end inside the span are
    missed, so this is a lower bound."""

    def __init__(self) -> None:
        self.cores = float("nan")
        self._start: dict[int, tuple[str, float]] = {}
        self._t0 = 0.0

    def __enter__(self) -> ForeignLoad:
        self._start = _cpu_by_pid()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        ours = _tree(os.getpid())
        end = _cpu_by_pid()
        used = 0.0
        for pid, (name, cpu) in end.items():
            if pid in ours or name in _NEUTRAL:
                continue
            # Kernel workers rename themselves with their work item (kworker/0:0-events ->
            # kworker/0:0-mm_percpu_wq): the same pid is the same process unless its CPU went
            # back (a pid reused within the span). A new pid started inside the span.
            before = self._start.get(pid)
            used += cpu - before[1] if before is not None and cpu >= before[1] else cpu
        self.cores = used / max(1e-9, time.perf_counter() - self._t0)


class ProcessCpu:
    """CPU seconds (utime + stime, from /proc) of one process and, apart, of its descendants,
    over the span: the service's main process against its pool workers, per request."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.main = float("nan")
        self.children = float("nan")
        self._start: tuple[float, dict[int, float]] = (0.0, {})

    def _read(self) -> tuple[float, dict[int, float]]:
        cpu = _cpu_by_pid()
        kids = _tree(self.pid) - {self.pid}
        return cpu.get(self.pid, ("", 0.0))[1], {p: cpu[p][1] for p in kids if p in cpu}

    def __enter__(self) -> ProcessCpu:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        main, kids = self._read()
        self.main = main - self._start[0]
        self.children = sum(v - self._start[1].get(p, 0.0) for p, v in kids.items())


def wait_quiet(limit: float, threshold: float = 0.25, span: float = 2.0) -> float:
    """Wait up to ``limit`` seconds for other load to fall below ``threshold`` cores over
    ``span`` seconds; returns the last measured load."""
    deadline = time.monotonic() + limit
    while True:
        with ForeignLoad() as load:
            time.sleep(span)
        if load.cores < threshold or time.monotonic() >= deadline:
            return load.cores
