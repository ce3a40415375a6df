"""The per-message flow and the acknowledgement policy (SPEC §7), in one place.

    size check → envelope → claim → pipeline (pool) → record → reply (confirmed) → ack

A small first delivery (up to ``INLINE_DECODE_BYTES``, never delivered before, no other copy
here) starts its pipeline job while its claim commits: the claim still counts the attempt and
finds a finished request before anything is recorded or published, and the job is cheap enough
to throw away when it does. Larger or redelivered requests claim first, so a request that crashes
its worker is not run again once it is out of attempts.

Acknowledgement policy — the only places this module settles a delivery:

* **ack** after the reply was confirmed by the broker and the database transaction committed
  (a new result, or the stored result of a request already done: a duplicate);
* **park, then ack** when the message itself is wrong (invalid input, the pipeline rejected its
  data, it exhausted memory, it ran out of attempts, its reply cannot be routed): the copy on the
  failed queue is confirmed and the failure recorded before the ack, so nothing is dropped;
* **leave unacked** while transient trouble (database, broker) lasts — the stage is retried in
  place with backoff and the prefetch window stops new deliveries; on shutdown, or when the
  delivery's channel is gone, **nack with requeue** (best effort: a closed channel requeues it too).
  A second copy of a request this process is already handling (its first delivery's channel was
  closed under it, or it was published twice) also stays unacked: it waits for the first, then
  answers with the stored result.

Whatever was recorded before a channel closed stays recorded: the redelivered copy finds it done
and only re-publishes it, so a request is trained once however often it is delivered.

aio-pika's ``message.process()`` is not used: it rejects on any exception, cancellation included,
which would drop messages at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from deployflag import __version__, logs, poison, sentry, worker
from deployflag.broker import tolerant
from deployflag.broker.publisher import Publisher, Unroutable
from deployflag.errors import InvalidRequest, TransientError
from deployflag.health import Health
from deployflag.messages import (
    Envelope,
    Reply,
    TrainingResult,
    celery_envelope_from_headers,
    encode_celery_reply,
    encode_json_reply,
)
from deployflag.metrics import Metrics
from deployflag.pool import JobTimeLimit, WorkerCrashed, WorkerPool
from deployflag.settings import Settings
from deployflag.store import Store

T = TypeVar("T")
log = logs.get_logger("deployflag.handler")

# Bodies up to this size are decoded on the loop: cheaper than a round trip to the pool, and
# bounded, so the loop still never does work proportional to a large payload.
INLINE_DECODE_BYTES = 64 * 1024
_BROKER_ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError)
# aiormq waits, without a timeout, until an ack's frame is written: on a connection that died
# under it, for ever. Past this, the ack counts as failed (the broker redelivers).
SETTLE_TIMEOUT = 10.0


class Abandon(Exception):
    """Stop handling this delivery without settling it; the broker will deliver it again."""


@dataclass
class Park(Exception):
    reason: str
    error: str
    request_id: str | None = None
    repo_id: int | str | None = None


@dataclass
class Trace:
    """Stage durations and the outcome of one delivery, for the summary line and metrics."""

    started: float = field(default_factory=time.perf_counter)
    stages: dict[str, float] = field(default_factory=dict)
    outcome: str = "abandoned"
    reason: str = ""

    async def timed(self, stage: str, awaitable: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start


class MessageHandler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        pool: WorkerPool,
        publisher: Publisher,
        metrics: Metrics,
        health: Health,
        stopping: asyncio.Event,
    ) -> None:
        self._s = settings
        self._store = store
        self._pool = pool
        self._publisher = publisher
        self._metrics = metrics
        self._health = health
        self._stopping = stopping
        self._config = settings.pipeline_config()
        self._origin = f"deployflag@{socket.gethostname()}"
        self._running: dict[str, asyncio.Event] = {}  # request ids being handled here
        self._failures = poison.FailureCounter()  # unexpected failures per message

    # --- entry point --------------------------------------------------------------------------

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        trace = Trace()
        self._metrics.in_flight.inc()
        try:
            await self._handle(message, trace)
        except Abandon as exc:
            trace.outcome, trace.reason = "requeued", str(exc)
            await self._requeue(message)
        except asyncio.CancelledError:
            trace.outcome = "requeued"
            await asyncio.shield(self._requeue(message))
            raise
        except Exception as exc:  # a bug in the shell: keep the message, keep serving
            trace.outcome, trace.reason = "error", type(exc).__name__
            log.exception("unexpected error handling a message")
            sentry.capture(exc, request_id=_bound("request_id"), repo_id=_bound("repo_id"))
            await self._requeue_or_park(message, exc, trace)
        finally:
            self._metrics.in_flight.dec()
            self._finish(message, trace)

    def _finish(self, message: AbstractIncomingMessage, trace: Trace) -> None:
        total = time.perf_counter() - trace.started
        for stage, seconds in trace.stages.items():
            self._metrics.stage_seconds.labels(stage=stage).observe(seconds)
        self._metrics.stage_seconds.labels(stage="total").observe(total)
        if trace.outcome in ("ok", "duplicate", "parked"):
            label = "" if trace.outcome != "parked" else trace.reason
            self._metrics.requests.labels(outcome=trace.outcome, reason=label).inc()
            self._metrics.observe_publish_to_ack(message.timestamp)
        log.info(
            "request finished",
            outcome=trace.outcome,
            reason=trace.reason or None,
            seconds=round(total, 4),
            **{f"{k}_seconds": round(v, 4) for k, v in trace.stages.items()},
        )
        structlog.contextvars.clear_contextvars()

    # --- the flow -----------------------------------------------------------------------------

    async def _handle(self, message: AbstractIncomingMessage, trace: Trace) -> None:
        try:
            await self._flow(message, trace)
        except Park as park:
            await self._park(message, park, trace)
        except InvalidRequest as exc:  # the database refused a value (a data exception)
            refused = Park(exc.reason, exc.message, _bound("request_id"), _bound("repo_id"))
            await self._park(message, refused, trace)

    async def _requeue_or_park(
        self, message: AbstractIncomingMessage, exc: Exception, trace: Trace
    ) -> None:
        """Requeue after an unexpected failure, or park as ``internal_error`` once the same
        message has failed unexpectedly a few times: nothing requeues without bound."""
        rid = _bound("request_id")
        key = poison.failure_key(rid, message.message_id, message.body)
        count = self._failures.failed(key, redelivered=bool(message.redelivered))
        if not self._failures.exhausted(count):
            await self._requeue(message)
            return
        error = f"{type(exc).__name__}: {exc} (failed unexpectedly {count} times)"
        # Recorded and parked; if even recording fails, parked without the record.
        for park in (
            Park("internal_error", error, rid, _bound("repo_id")),
            Park("internal_error", f"{error}; request id {rid}", None),
        ):
            try:
                await self._park(message, park, trace)
            except Abandon:
                return  # its channel is gone: the broker redelivers it, and it is counted again
            except Exception:
                log.exception("parking a failing message failed", request_id=rid)
                continue
            self._failures.forget(key)
            return
        await self._requeue(message)

    async def _flow(self, message: AbstractIncomingMessage, trace: Trace) -> None:
        delivery = worker.Delivery(
            message.body, dict(message.headers or {}), message.message_id, message.content_type
        )
        if (undecodable := tolerant.undecodable(message.headers)) is not None:
            rid = await asyncio.to_thread(worker.fallback_id, delivery)
            raise Park("undecodable_properties", f"could not decode: {undecodable}", rid)
        if len(delivery.body) > self._s.max_message_bytes:
            rid = await asyncio.to_thread(worker.fallback_id, delivery)
            raise Park(
                "too_large",
                f"body of {len(delivery.body)} bytes exceeds DEPLOYFLAG_MAX_MESSAGE_BYTES "
                f"({int(self._s.max_message_bytes)})",
                rid,
            )
        envelope = await trace.timed("decode", self._identify(message, delivery))
        envelope = envelope.model_copy(
            update={"body_digest": await poison.body_digest(delivery.body)}
        )
        structlog.contextvars.bind_contextvars(
            request_id=envelope.request_id, repo_id=envelope.repo_id
        )
        async with self._one_copy_at_a_time(message, envelope.request_id, trace) as waited:
            speculate = not (waited or message.redelivered) and (
                len(delivery.body) <= INLINE_DECODE_BYTES
            )
            result, trace.outcome = await self._result(
                message, delivery, envelope, trace, speculate=speculate
            )
        # Recorded; if the delivery's channel died meanwhile, its redelivered copy answers.
        self._check_alive(message)
        await trace.timed("publish", self._reply(message, envelope, result))
        await self._ack(message)

    @contextlib.asynccontextmanager
    async def _one_copy_at_a_time(
        self, message: AbstractIncomingMessage, request_id: str, trace: Trace
    ) -> AsyncIterator[bool]:
        """Claim, train and record one copy of a request at a time in this process; yields
        whether this copy had to wait for another (then it is most likely a duplicate).

        A second copy arrives while the first is still training when the first one's channel
        closed under it (consumer_timeout, a reconnect) or the request was published twice. It
        waits here instead of claiming — which would spend an attempt and train again in
        parallel — and then finds the stored result. Only the expensive part is exclusive: the
        reply and the ack of either copy never wait for the other.
        """
        waited = False
        while (running := self._running.get(request_id)) is not None:
            waited = True
            await trace.timed("claim", running.wait())
            self._check_alive(message)
        done = asyncio.Event()
        self._running[request_id] = done
        try:
            yield waited
        finally:
            del self._running[request_id]
            done.set()

    async def _result(
        self,
        message: AbstractIncomingMessage,
        delivery: worker.Delivery,
        envelope: Envelope,
        trace: Trace,
        *,
        speculate: bool,
    ) -> tuple[TrainingResult, str]:
        """The request's recorded result, trained here (``ok``) or found (``duplicate``).

        ``speculate``: start the pipeline job now and claim meanwhile (see the module's notes).
        """
        early = asyncio.ensure_future(self._run_job(delivery)) if speculate else None
        try:
            claim = await trace.timed(
                "claim", self._retry("claim", message, self._claim_call(envelope))
            )
            if claim.status == "conflict":
                raise _id_conflict(envelope, claim.known_repo_id)
            if claim.status == "done" or claim.attempts > self._s.max_attempts:
                await _discard(early)
                early = None
            if claim.status == "done":
                assert claim.result is not None
                return TrainingResult.model_validate(claim.result), "duplicate"
            job, early = early, None
            computed = await trace.timed(
                "pipeline", self._compute(message, delivery, envelope, claim.attempts, job)
            )
        finally:
            if early is not None:  # the claim failed or was cancelled: the job is not wanted
                _abandon(early)
        if isinstance(computed, TrainingResult):  # another instance finished it meanwhile
            return computed, "duplicate"
        if envelope.repo_id is None:  # identified from its headers: the body had it
            structlog.contextvars.bind_contextvars(repo_id=computed.computation.repo_id)
        result = TrainingResult(
            **computed.computation.model_dump(),
            request_id=envelope.request_id,
            deployflag_version=__version__,
            finished_at=datetime.now(UTC),
        )
        self._encode(envelope, result)  # a reply too large is parked before "done" is recorded
        fresh, stored_json = await trace.timed(
            "record",
            self._retry("record", message, lambda: self._store.record_result(result, self._config)),
        )
        if not fresh:  # a concurrent copy recorded first: publish what was stored
            return TrainingResult.model_validate(stored_json), "duplicate"
        return result, "ok"

    def _claim_call(self, envelope: Envelope) -> Callable[[], Awaitable[Any]]:
        return lambda: self._store.claim(
            envelope.request_id, envelope.repo_id, envelope.body_digest
        )

    async def _identify(
        self, message: AbstractIncomingMessage, delivery: worker.Delivery
    ) -> Envelope:
        task_name = self._s.training_task_name
        if len(delivery.body) <= INLINE_DECODE_BYTES:
            found = worker.identify(delivery, task_name)
        elif headed := celery_envelope_from_headers(
            delivery.headers, delivery.content_type, task_name
        ):
            # The usual upstream message: no need to ship and parse a large body twice.
            found = headed
        else:
            found = await self._in_pool(message, worker.identify, delivery, task_name)
        if isinstance(found, worker.Rejected):
            raise Park(found.reason, found.message, found.request_id)
        return found

    async def _in_pool(
        self, message: AbstractIncomingMessage, fn: Callable[..., T], *args: Any
    ) -> T:
        """A short pool call (no attempts to count): retried across pool rebuilds."""
        for _ in range(self._s.max_attempts):
            try:
                return await self._pool.run(fn, *args, time_limit=self._s.job_time_limit)
            except WorkerCrashed:
                self._check_alive(message)
            except JobTimeLimit as exc:
                raise Park("time_limit", str(exc)) from None
        raise Park("worker_crashed", "the worker died on every try")

    async def _compute(
        self,
        message: AbstractIncomingMessage,
        delivery: worker.Delivery,
        envelope: Envelope,
        attempts: int,
        started: asyncio.Future[worker.Computed] | None = None,
    ) -> worker.Computed | TrainingResult:
        """Run the pipeline (``started``: its first try, already running); a crash or time
        limit costs an attempt, and the last one parks."""
        reason, error = "max_attempts", "delivered more often than DEPLOYFLAG_MAX_ATTEMPTS"
        free_retries = self._s.max_attempts  # for pools killed over another job's time limit
        while attempts <= self._s.max_attempts:
            try:
                if started is not None:
                    job, started = started, None
                    return await job
                return await self._run_job(delivery)
            except InvalidRequest as exc:
                raise Park(exc.reason, exc.message, envelope.request_id, envelope.repo_id) from None
            except JobTimeLimit as exc:
                reason, error = "time_limit", str(exc)
            except WorkerCrashed as exc:
                if exc.collateral and free_retries > 0:
                    free_retries -= 1
                    log.info("pool killed over another job's time limit: retrying, not counted")
                    self._check_alive(message)
                    continue
                reason, error = "worker_crashed", str(exc)
            log.warning("attempt failed", reason=reason, error=error, attempt=attempts)
            self._check_alive(message)
            claim = await self._retry("claim", message, self._claim_call(envelope))
            if claim.status == "done":
                assert claim.result is not None
                return TrainingResult.model_validate(claim.result)
            attempts = claim.attempts
        raise Park(
            reason,
            f"{error} (gave up after {self._s.max_attempts} attempts)",
            envelope.request_id,
            envelope.repo_id,
        )

    async def _run_job(self, delivery: worker.Delivery) -> worker.Computed:
        return await self._pool.run(
            worker.process,
            delivery,
            self._s.training_task_name,
            self._config,
            time_limit=self._s.job_time_limit,
        )

    # --- settling -----------------------------------------------------------------------------

    async def _reply(
        self, message: AbstractIncomingMessage, envelope: Envelope, result: TrainingResult
    ) -> None:
        reply = self._encode(envelope, result)
        # A Celery producer always sets reply_to to its own result-backend queue: that names
        # where Celery task results go, not a deployflag reply queue, so Celery requests are
        # answered on the result queue.
        reply_to = message.reply_to if envelope.kind == "json" else None
        try:
            await self._retry(
                "publish",
                message,
                lambda: self._publisher.reply(
                    reply, correlation_id=envelope.request_id, reply_to=reply_to
                ),
            )
        except Unroutable as exc:
            raise Park(
                "reply_unroutable",
                f"the reply could not be routed: {exc}",
                envelope.request_id,
                envelope.repo_id,
            ) from None

    def _encode(self, envelope: Envelope, result: TrainingResult) -> Reply:
        form = self._s.reply_format if self._s.reply_format != "auto" else envelope.kind
        if form == "celery":
            reply = encode_celery_reply(result, self._s.result_task_name, self._origin)
        else:
            reply = encode_json_reply(result)
        if len(reply.body) > self._s.max_message_bytes:
            raise Park(
                "reply_too_large",
                f"the reply of {len(reply.body)} bytes exceeds DEPLOYFLAG_MAX_MESSAGE_BYTES",
                envelope.request_id,
                envelope.repo_id,
            )
        return reply

    async def _park(self, message: AbstractIncomingMessage, park: Park, trace: Trace) -> None:
        rid = park.request_id
        log.warning("parking request", reason=park.reason, error=park.error, request_id=rid)
        if rid is not None:
            await trace.timed(
                "record",
                self._retry(
                    "record",
                    message,
                    lambda: self._store.record_failure(rid, park.repo_id, park.reason, park.error),
                ),
            )
        await trace.timed(
            "publish",
            self._retry(
                "park",
                message,
                lambda: self._publisher.park(
                    message, request_id=rid, reason=park.reason, error=park.error
                ),
            ),
        )
        await self._ack(message)
        trace.outcome, trace.reason = "parked", park.reason

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        self._check_alive(message)
        try:
            await asyncio.wait_for(message.ack(), SETTLE_TIMEOUT)
        except _BROKER_ERRORS as exc:
            # The channel went away after the work was recorded: the redelivered copy will
            # find the stored result and only re-publish it.
            raise Abandon(f"ack failed: {exc}") from None

    async def _requeue(self, message: AbstractIncomingMessage) -> None:
        if message.processed or _channel_gone(message):
            return  # a closed channel hands its unacked deliveries back by itself
        with contextlib.suppress(*_BROKER_ERRORS):
            await asyncio.wait_for(message.nack(requeue=True), SETTLE_TIMEOUT)

    def _check_alive(self, message: AbstractIncomingMessage) -> None:
        if _channel_gone(message):
            raise Abandon("the delivery's channel closed; the broker redelivers it")

    # --- transient trouble --------------------------------------------------------------------

    async def _retry(
        self, stage: str, message: AbstractIncomingMessage, call: Callable[[], Awaitable[T]]
    ) -> T:
        """Retry ``call`` with capped exponential backoff while the trouble is transient."""
        delay = self._s.retry_backoff_initial
        database = stage in ("claim", "record")
        while True:
            try:
                value = await call()
            except TransientError as exc:
                error: Exception = exc
            except _BROKER_ERRORS as exc:
                if database:
                    raise
                error = exc
            else:
                if database and not self._health.database_ok:
                    self._health.database_ok = True
                    self._metrics.database_ok.set(1)
                    log.info("database reachable again")
                return value
            if database:
                self._health.database_ok = False
                self._metrics.database_ok.set(0)
            self._metrics.requests.labels(outcome="retried", reason=stage).inc()
            log.warning("transient failure", stage=stage, error=str(error), retry_in=delay)
            if self._stopping.is_set():
                raise Abandon(f"{stage} failed while stopping: {error}")
            self._check_alive(message)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, self._s.retry_backoff_max)


async def _discard(job: asyncio.Future[Any] | None) -> None:
    """Let a job nobody needs finish, whatever its outcome: it is small, and cancelling it
    would free its pool slot while its worker is still busy with it."""
    if job is not None:
        with contextlib.suppress(Exception):
            await job


def _abandon(job: asyncio.Future[Any]) -> None:
    """Cancel a job nobody will await, and keep its outcome out of the "never retrieved" log."""
    job.cancel()
    job.add_done_callback(lambda done: done.cancelled() or done.exception())


def _id_conflict(envelope: Envelope, known_repo_id: str | None) -> Park:
    """A known request id with another body: parked, never answered with the other's result.
    Not recorded (``request_id`` None): the row belongs to the first body."""
    return Park(
        "id_conflict",
        f"request id {envelope.request_id!r} is already known with another body (stored for "
        f"repo {known_repo_id!r}); this message is for repo {envelope.repo_id!r}, body "
        f"sha256 {envelope.body_digest}",
    )


def _bound(key: str) -> Any:
    return structlog.contextvars.get_contextvars().get(key)


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    """Whether the channel the message came on is closed (aio-pika's ``message.channel``
    raises instead of answering once it is)."""
    try:
        return bool(message.channel.is_closed)
    except ChannelInvalidStateError:
        return True
