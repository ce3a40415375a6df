"""`deployflag serve`: wiring, start-up and shutdown.

Start-up: settings → logs → database (migrated) → worker pool (warm) → broker topology → HTTP →
consumer → READY=1. Shutdown on SIGTERM/SIGINT, in dramatiq's order: stop taking messages, keep the
connection up (heartbeats, acks) while in-flight work finishes within the drain timeout, hand back
what is left, then close everything. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
from collections.abc import Awaitable
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from deployflag import __version__, logs, sentry, systemd, tls, worker
from deployflag.broker import nodes, topology
from deployflag.broker.blocking import watch_blocked
from deployflag.broker.burst import BurstConsumer, BurstPolicy
from deployflag.broker.connection import connect
from deployflag.broker.publisher import Publisher
from deployflag.errors import FatalError, TransientError
from deployflag.exitcodes import RET_BROKER, RET_CONFIG, RET_DATABASE, RET_OK
from deployflag.handler import INLINE_DECODE_BYTES, MessageHandler
from deployflag.health import Health, mark_database, monitor_loop
from deployflag.http import start_http, stop_http
from deployflag.metrics import Metrics
from deployflag.pool import WorkerPool
from deployflag.redaction import redact
from deployflag.settings import Settings
from deployflag.store.repository import Store

log = logs.get_logger("deployflag.service")
CLOSE_TIMEOUT = 10.0  # seconds for the broker connection to close
# SIGHUP drains too: a closed terminal or a supervisor's hang-up must not kill in-flight work
# (its default action exits at once, status 129, which systemd does not restart).
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health.from_settings(settings)
        self.stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[Any]] = []
        self._store: Store | None = None
        self._pool: WorkerPool | None = None
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._burst: BurstConsumer | None = None
        self._http: Any = None
        self._handler: MessageHandler | None = None
        # The first FatalError met while serving: the service drains, stops, exits with its code.
        self.fatal: FatalError | None = None

    # --- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        log.info("starting", version=__version__, **s.describe())
        self._background.append(asyncio.create_task(monitor_loop(self.health, self.metrics)))
        self._http = await start_http(s, self.health, self.metrics)

        self._store = await self._open_store()
        if self._store is None:
            return  # a signal came while waiting
        mark_database(self.health, self.metrics, ok=True)

        self._background.append(asyncio.create_task(self._watch_database(self._store)))

        self._pool = WorkerPool(s, on_rebuild=self._on_pool_rebuild, on_health=self._on_pool_health)
        if s.effective_inline_job_bytes > 0:  # the imports in a thread while workers start
            await asyncio.gather(
                self._pool.start(), asyncio.to_thread(worker.prepare_compute, s.max_shortcodes)
            )
        else:
            await self._pool.start()

        if self.stopping.is_set():
            return
        self._connection = await self._connect()
        consume_channel = await self._connection.channel()
        await consume_channel.set_qos(prefetch_count=s.effective_prefetch)
        publish_channel = await self._connection.channel(publisher_confirms=True)
        declared = await topology.declare(publish_channel, s)
        self._queue = await consume_channel.get_queue(s.training_queue, ensure=True)
        publisher = Publisher(publish_channel, declared.exchange, s)
        handler = MessageHandler(
            s,
            self._store,
            self._pool,
            publisher,
            self.metrics,
            self.health,
            self.stopping,
            on_fatal=self.stop_for,
        )
        self._handler = handler
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)
        if self.stopping.is_set():  # a signal during start-up: stop before taking anything
            log.info("stopping before consuming")
            return
        self._background.append(
            asyncio.create_task(watch_blocked(self._connection, self.health, self.metrics))
        )
        # What start-up created (modules, settings, numpy and scikit-learn for the jobs computed
        # here) lives as long as the process: out of the collector's full passes, each of which
        # would otherwise hold the loop for tens of milliseconds while requests are served.
        gc.collect()
        gc.freeze()
        self._burst = await self._burst_consumer()
        self._consumer_tag = await self._queue.consume(self._dispatch)
        self._set_consuming(True)
        systemd.notify("READY=1\nSTATUS=consuming " + s.training_queue)
        self._background.append(asyncio.create_task(systemd.watchdog_task(self.health)))
        log.info(
            "consuming",
            queue=s.training_queue,
            prefetch=s.effective_prefetch,
            burst_prefetch=s.effective_burst_prefetch,
        )

    async def _burst_consumer(self) -> BurstConsumer | None:
        """The wider window for short requests (broker/burst.py); None when turned off."""
        s = self.settings
        self.metrics.prefetch_window.set(s.effective_prefetch)
        if s.effective_burst_prefetch == 0:
            return None
        assert self._connection is not None
        policy = BurstPolicy(
            short_seconds=s.burst_short_seconds,
            large_bytes=INLINE_DECODE_BYTES,
            streak_needed=s.effective_prefetch + s.effective_burst_prefetch,
        )
        burst = BurstConsumer(
            self._connection,
            s.training_queue,
            prefetch=s.effective_burst_prefetch,
            base_prefetch=s.effective_prefetch,
            policy=policy,
            dispatch=self._dispatch,
            metrics=self.metrics,
        )
        await burst.start()
        return burst

    async def _open_store(self) -> Store | None:
        """Open the database, waiting for it like for the broker (a database restarting with
        the service must not make it exit); None when a signal came meanwhile."""
        delay, waited = 0.5, 0.0
        while True:
            try:
                return await Store.open(self.settings)
            except TransientError as exc:
                error = exc
            if waited >= self.settings.database_connect_timeout:
                raise FatalError(f"database unreachable: {error}", RET_DATABASE) from None
            log.warning("database not reachable yet", error=str(error), retry_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return None
            waited += delay
            delay = min(delay * 2, 5.0)

    def stop_for(self, error: FatalError) -> None:
        """Stop serving because of ``error``: drain, close, exit with its code."""
        if self.fatal is None:
            self.fatal = error
            log.error("stopping on a fatal error", error=redact(str(error)), code=error.exit_code)
        self.stopping.set()

    async def _watch_database(self, store: Store) -> None:
        """Keep /readyz honest while no message touches the database; stop on a fatal error."""
        while True:
            await asyncio.sleep(self.settings.database_check_interval)
            try:
                await store.ping()
            except FatalError as exc:
                mark_database(self.health, self.metrics, ok=False, error=str(exc))
                self.stop_for(exc)
                return
            except Exception as exc:  # whatever it is, the database is not answering
                error = f"{type(exc).__name__}: {exc}"
                mark_database(self.health, self.metrics, ok=False, error=error)
            else:
                mark_database(self.health, self.metrics, ok=True)

    async def _connect(self) -> AbstractRobustConnection:
        delay, waited = 0.5, 0.0
        error: Exception
        while True:
            try:
                return await self._connect_once()
            except (OSError, ConnectionError, TimeoutError) as exc:
                error = exc
            except FatalError:
                raise
            except Exception as exc:  # aio-pika wraps errors in its own types
                error = exc
            if waited >= self.settings.broker_connect_timeout or self.stopping.is_set():
                raise FatalError(
                    f"broker unreachable at {nodes.describe(self.settings.broker_urls)}: "
                    f"{redact(str(error))}",
                    RET_BROKER,
                )
            log.warning("broker not reachable yet", error=redact(str(error)), retry_in=delay)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)

    async def _connect_once(self) -> AbstractRobustConnection:
        try:
            return await connect(self.settings)
        except Exception as exc:
            # aiormq's refusal is a ConnectionError: look at it before anything is retried.
            if "ACCESS_REFUSED" in str(exc) or "authentication" in str(exc).lower():
                raise FatalError(
                    f"broker refused the credentials of "
                    f"{nodes.describe(self.settings.broker_urls)}: {redact(str(exc))}",
                    RET_CONFIG,
                ) from None
            failure = tls.tls_failure(exc)
            if failure is None:
                raise
            # Retrying cannot make a certificate valid: stop with a configuration error.
            raise FatalError(
                f"broker TLS at {nodes.describe(self.settings.broker_urls)}: {failure} "
                "(check DEPLOYFLAG_AMQP_CA_FILE and the URL's host name)",
                RET_CONFIG,
            ) from None

    async def _dispatch(self, message: AbstractIncomingMessage) -> None:
        # Our own task per delivery (the prefetch window bounds how many exist), not aiormq's:
        # aiormq cancels its tasks when a channel closes, which would throw away a training that
        # can still be recorded, and answered by the redelivered copy.
        assert self._handler is not None
        task = asyncio.create_task(self._handler(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if (burst := self._burst) is not None:
            token = burst.started(message)
            task.add_done_callback(lambda _: burst.finished(token))

    def _set_consuming(self, ready: bool) -> None:
        self.health.consumer_ready = ready
        self.metrics.consumer_ready.set(1 if ready else 0)

    def _on_connection_lost(self, *_: Any) -> None:
        if not self.stopping.is_set():
            log.warning("broker connection lost; reconnecting")
        self._set_consuming(False)

    def _on_reconnected(self, *_: Any) -> None:
        # The robust channel re-declares the queue and re-registers the consumer on reconnect.
        log.info("broker connection restored; consumer re-registered")
        self._set_consuming(not self.stopping.is_set())

    def _on_pool_rebuild(self, cause: str) -> None:
        self.metrics.pool_rebuilds.labels(cause=cause).inc()

    def _on_pool_health(self, ok: bool) -> None:
        self.health.pool_alive = ok

    # --- stop ---------------------------------------------------------------------------------

    async def drain_and_close(self) -> None:
        s = self.settings
        self.health.draining = True
        self._set_consuming(False)
        systemd.notify("STOPPING=1")
        log.info("stopping: no new messages", in_flight=len(self._tasks))
        if self._burst is not None:
            await self._close_step("burst consumer", self._burst.close())
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), 10)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=s.drain_timeout)
            if pending:
                log.warning("drain timeout: handing messages back", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=10)
        await self.close()
        log.info("stopped")

    async def close(self) -> None:
        """Close every part, each on its own: one that fails is logged, the rest still close."""
        for task in self._background:
            task.cancel()
        await self._close_step("broker connection", self._close_connection())
        if self._pool is not None:
            await self._close_step("worker pool", self._pool.close())
        if self._store is not None:
            await self._close_step("database", self._store.close())
        await self._close_step("HTTP endpoint", stop_http(self._http))

    async def _close_connection(self) -> None:
        if self._connection is not None:
            await asyncio.wait_for(self._connection.close(), CLOSE_TIMEOUT)

    @staticmethod
    async def _close_step(part: str, closing: Awaitable[None]) -> None:
        try:
            await closing
        except Exception as exc:  # closing anyway: nothing left to do about it but say so
            log.warning("could not close cleanly", part=part, error=redact(f"{exc!r}"))


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    sentry.init_sentry(settings)
    service = Service(settings)
    loop = asyncio.get_running_loop()
    signals_seen: list[int] = []

    def on_signal(signum: int) -> None:
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            log.warning("second signal: exiting at once", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("signal received: draining", signal=signal.Signals(signum).name)
        service.stopping.set()

    for signum in DRAIN_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        try:
            await service.start()
        except BaseException:
            await service.close()
            raise
        await service.stopping.wait()
        await service.drain_and_close()
        return service.fatal.exit_code if service.fatal is not None else RET_OK
    finally:
        for signum in DRAIN_SIGNALS:
            loop.remove_signal_handler(signum)
