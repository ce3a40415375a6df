"""The per-message flow and the acknowledgement policy, in one place.

    size check → envelope → claim → pipeline (pool) → record → reply (confirmed) → ack

A small first delivery (up to ``INLINE_DECODE_BYTES``, never delivered before, no other copy
here) runs its pipeline job before any write, then claims and records in one transaction
(``Store.claim_and_record``): one write instead of two, and nothing on the database between
the delivery and its job. The claim still counts the attempt and finds a finished request
before anything is recorded or published; the job is cheap enough to throw away when it does.
A job that fails (its worker died, the time limit) is claimed afterwards, so the failure
counts. Larger or redelivered requests claim first, so a request that crashes the service
itself is not run again once it is out of attempts. When such a small first delivery is the only
one in flight (and within ``DEPLOYFLAG_INLINE_JOB_MAX_BYTES``), its job runs here, in this
process, instead of in a worker: the round trip costs a lone request more than its computation.

The acknowledgement policy: every exception the flow can meet ends in ``__call__`` with one
settlement (docs/handler.md has the same table, with every park reason):

    exception or event                        settlement                               outcome
    ----------------------------------------  ---------------------------------------  ---------
    none: trained, recorded, reply confirmed  ack                                      ok
    claim finds it done; record loses a race  publish the stored result, ack           duplicate
    a second copy of a request in flight      wait for the first, then as done         duplicate
    InvalidRequest: the body, the pipeline,   park: confirmed copy on the failed       parked
      memory, attempts, the reply               queue, failure recorded, then ack
    a property the client could not decode    park undecodable_properties (before      parked
                                                anything else is read)
    InvalidRequest("bad_data") from the       park bad_data; if the failure cannot be  parked
      store: the database refused a value       recorded either, park without the row
    claim: the id is known with another body  park id_conflict, the other body's row   parked
                                                left alone (not recorded)
    the reply is over the size limit          park reply_too_large before the result   parked
                                                is recorded as done
    WorkerCrashed, JobTimeLimit               attempt counted, tried again; the last   parked
                                                one parks
    TransientError, broker errors             retried in place with backoff, unacked   (retried)
    channel closed, ack failed                left to the broker (nack if it answers)  requeued
    stopping during a retry; cancellation     nack with requeue (shielded)             requeued
    FatalError: credentials, schema           left unacked: requeued when the channel  requeued
                                                closes; the service stops, drains and
                                                exits with the error's code
    any other exception: a bug                logged, sent to Sentry, nack + requeue   error
    ... the same message's third unexpected   park internal_error (the exception       parked
      failure (poison.FailureCounter)           text); if that fails, park unrecorded

Whatever was recorded before a channel closed stays recorded: the redelivered copy finds it done
and only re-publishes it, so a request is trained once however often it is delivered.

aio-pika's ``message.process()`` is not used: it rejects on any exception, cancellation included,
which would drop messages at shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractIncomingMessage

from deployflag import __version__, logs, poison, sentry, worker
from deployflag.broker import tolerant
from deployflag.broker.publisher import Publisher, Unroutable
from deployflag.delivery import BROKER_ERRORS, Abandon, Delivery, OneCopyAtATime
from deployflag.errors import FatalError, InvalidRequest, TransientError
from deployflag.health import Health, mark_database
from deployflag.messages import (
    Envelope,
    Reply,
    TrainingResult,
    celery_envelope_from_headers,
    encode_reply,
)
from deployflag.metrics import Metrics
from deployflag.observer import Outcome, Trace
from deployflag.pool import JobTimeLimit, WorkerCrashed, WorkerPool, abandon, discard
from deployflag.retry import Backoff, retry
from deployflag.settings import Settings
from deployflag.store import Claim, Store

T = TypeVar("T")
MAX_ATTEMPTS_ERROR = "delivered more often than DEPLOYFLAG_MAX_ATTEMPTS"
log = logs.get_logger("deployflag.handler")

# Bodies up to this size are decoded on the loop: cheaper than a round trip to the pool, and
# bounded, so the loop still never does work proportional to a large payload.
INLINE_DECODE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """The recorded result a delivery is answered with, and how it was obtained."""

    result: TrainingResult
    outcome: Outcome  # OK (trained here) or DUPLICATE (found stored)


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
        on_fatal: Callable[[FatalError], None] | None = None,
    ) -> None:
        self._s = settings
        self._store = store
        self._pool = pool
        self._publisher = publisher
        self._metrics = metrics
        self._health = health
        self._stopping = stopping
        self._on_fatal = on_fatal or (lambda _: stopping.set())
        self._config = settings.pipeline_config()
        self._backoff = Backoff(settings.retry_backoff_initial, settings.retry_backoff_max)
        self._origin = f"deployflag@{socket.gethostname()}"
        self._copies = OneCopyAtATime()
        self._failures = poison.FailureCounter()  # unexpected failures per message
        self._inline_bytes = settings.effective_inline_job_bytes
        self._in_flight = 0  # deliveries in this handler, settled or not

    # --- entry point: every exception ends here, each with its settlement ---------------------

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        d = Delivery(message, Trace(self._metrics))
        self._metrics.in_flight.inc()
        self._in_flight += 1
        try:
            if self._stopping.is_set():
                # Arrived between the decision to stop and the consumer's cancellation: left
                # unacked, the broker requeues it when the channel closes after the drain.
                d.trace.settle(Outcome.REQUEUED, "stopping")
                return
            try:
                await self._flow(d)
            except InvalidRequest as rejection:
                await self._park(d, rejection)
        except FatalError as exc:
            # Configuration, credentials or schema: no retry and no park can help, and every
            # later request would fail the same way. Left unacked (requeued when the channel
            # closes, so no copy comes back to this instance); the service stops and exits.
            d.trace.settle(Outcome.REQUEUED, "fatal")
            self._on_fatal(exc)
        except Abandon as exc:
            d.trace.settle(Outcome.REQUEUED, str(exc))
            await d.requeue()
        except asyncio.CancelledError:
            d.trace.settle(Outcome.REQUEUED)
            await asyncio.shield(d.requeue())
            raise
        except Exception as exc:  # a bug in the shell: keep the message, keep serving
            d.trace.settle(Outcome.ERROR, type(exc).__name__)
            log.exception("unexpected error handling a message")
            sentry.capture(exc, request_id=_bound("request_id"), repo_id=_bound("repo_id"))
            await self._requeue_or_park(d, exc)
        finally:
            self._in_flight -= 1
            self._metrics.in_flight.dec()
            d.trace.finish(message.timestamp)
            structlog.contextvars.clear_contextvars()

    # --- the flow -----------------------------------------------------------------------------

    async def _requeue_or_park(self, d: Delivery, exc: Exception) -> None:
        """Requeue after an unexpected failure, or park as ``internal_error`` once the same
        message has failed unexpectedly a few times: nothing is requeued without bound."""
        if d.message.processed:
            return  # settled before it failed
        rid, repo_id = _bound("request_id"), _bound("repo_id")
        key = poison.failure_key(rid, d.message.message_id, d.message.body)
        count = self._failures.failed(key, redelivered=d.redelivered)
        if not self._failures.exhausted(count):
            await d.requeue()
            return
        rejection = poison.internal_error(exc, count, rid, repo_id)
        for attempt in (rejection, poison.unrecorded(rejection)):  # the second without the row
            try:
                await self._park(d, attempt)
            except Abandon:
                return  # its channel is gone: the broker redelivers it, and it is counted again
            except Exception:
                log.exception("parking a failing message failed", request_id=rid)
                continue
            self._failures.forget(key)
            return
        await d.requeue()

    async def _flow(self, d: Delivery) -> None:
        if (undecodable := tolerant.undecodable(d.message.headers)) is not None:
            raise InvalidRequest(
                "undecodable_properties",
                f"could not decode: {undecodable}",
                await asyncio.to_thread(worker.fallback_id, d.job()),
            )
        if d.size > self._s.max_message_bytes:
            raise InvalidRequest(
                "too_large",
                f"body of {d.size} bytes exceeds DEPLOYFLAG_MAX_MESSAGE_BYTES "
                f"({int(self._s.max_message_bytes)})",
                await asyncio.to_thread(worker.fallback_id, d.job()),
            )
        envelope = await d.trace.timed("decode", self._identify(d))
        digest = await poison.body_digest(d.message.body)  # tells a reused id's other body apart
        while True:
            d.envelope = envelope = envelope.model_copy(update={"body_digest": digest})
            structlog.contextvars.bind_contextvars(
                request_id=envelope.request_id, repo_id=envelope.repo_id
            )
            try:
                async with self._copies.exclusive(d, envelope.request_id) as waited:
                    speculate = not (waited or d.redelivered) and d.size <= INLINE_DECODE_BYTES
                    # Alone here: nothing waits behind it on the loop, so the job runs in
                    # this process, without the round trip to a worker (docs/handler.md).
                    inline = speculate and d.size <= self._inline_bytes and self._in_flight == 1
                    answer = await self._answer(d, envelope, speculate=speculate, inline=inline)
                break
            except worker.EnvelopeMismatch as exc:  # presumed plain JSON; it was not
                envelope, d.presumed = exc.envelope, False
        d.trace.settle(answer.outcome)
        # Recorded; if the delivery's channel died meanwhile, its redelivered copy answers.
        d.check_alive()
        await d.trace.timed("publish", self._reply(d, envelope, answer.result))
        await d.ack()

    async def _identify(self, d: Delivery) -> Envelope:
        task_name = self._s.training_task_name
        job = d.job()
        if d.size <= INLINE_DECODE_BYTES:
            return worker.identify(job, task_name)
        # The usual upstream messages: no need to ship a large body to the pool twice.
        if headed := celery_envelope_from_headers(job.headers, job.content_type, task_name):
            return headed
        if presumed := worker.presume_json(job):
            d.presumed = True
            return presumed
        return await self._in_pool(d, worker.identify, job, task_name)

    async def _answer(
        self, d: Delivery, envelope: Envelope, *, speculate: bool, inline: bool = False
    ) -> Answer:
        """The request's recorded result: trained here, or found stored.

        ``speculate``: run the pipeline job first, claim with the record (the module's notes);
        ``inline``: that job in this process.
        """
        started = time.perf_counter()
        early = self._start_job(d, inline) if speculate else None
        try:
            if early is not None:
                folded = await self._fold(d, envelope, early, started)
                if folded is not None:
                    early = None
                    return folded
            claim = await d.trace.timed("claim", self._claim(d, envelope))
            if claim.status == "conflict":
                raise poison.id_conflict(envelope, claim.known_repo_id)
            if claim.status == "done" or claim.attempts > self._s.max_attempts:
                await discard(early)
                early = None
            if claim.status == "done":
                return _stored(claim.result)
            job, early = early, None
            answer = await d.trace.timed("pipeline", self._compute(d, claim.attempts, job))
        finally:
            if early is not None:  # the claim failed or was cancelled: the job is not wanted
                abandon(early)
        if answer.outcome is Outcome.DUPLICATE:  # another instance finished it meanwhile
            return answer
        self._encode(d, envelope, answer.result)  # a reply too large is parked before "done"
        fresh, stored_json = await d.trace.timed(
            "record",
            self._database(
                "record", d, lambda: self._store.record_result(answer.result, self._config)
            ),
        )
        return answer if fresh else _stored(stored_json)  # not fresh: a concurrent copy won

    async def _fold(
        self,
        d: Delivery,
        envelope: Envelope,
        early: asyncio.Future[worker.Computed],
        started: float,
    ) -> Answer | None:
        """The small job's answer, claimed and recorded in one transaction (the attempt still
        counted). None: the job failed; go on as usual (claim, then see the failure)."""
        await asyncio.wait((early,))  # its failure is not raised here
        if early.cancelled() or early.exception() is not None:
            return None
        elapsed = time.perf_counter() - started
        answer = Answer(self._result(envelope, early.result()), Outcome.OK)
        self._encode(d, envelope, answer.result)  # a reply too large is parked before "done"
        folded = await d.trace.timed(
            "record",
            self._database(
                "record",
                d,
                lambda: self._store.claim_and_record(
                    answer.result, self._config, envelope.body_digest, self._s.max_attempts
                ),
            ),
        )
        claim = folded.claim
        if claim.status == "conflict":
            raise poison.id_conflict(envelope, claim.known_repo_id)
        if claim.status == "done":  # the job is thrown away, and not timed as a pipeline run
            return _stored(claim.result)
        d.trace.stages["pipeline"] = elapsed
        if claim.attempts > self._s.max_attempts:  # counted, and nothing recorded
            raise self._gave_up("max_attempts", MAX_ATTEMPTS_ERROR)
        return answer if folded.recorded else _stored(folded.stored)

    async def _compute(
        self, d: Delivery, attempts: int, started: asyncio.Future[worker.Computed] | None
    ) -> Answer:
        """Run the pipeline (``started``: its first try, already running); a crash or time
        limit costs an attempt, and the last one parks."""
        assert d.envelope is not None
        reason, error = "max_attempts", MAX_ATTEMPTS_ERROR
        while attempts <= self._s.max_attempts:
            try:
                job, started = started, None
                computed = await (job if job is not None else self._run_job(d))
                return Answer(self._result(d.envelope, computed), Outcome.OK)
            except JobTimeLimit as exc:
                reason, error = "time_limit", str(exc)
            except WorkerCrashed as exc:
                reason, error = "worker_crashed", str(exc)
            log.warning("attempt failed", reason=reason, error=error, attempt=attempts)
            d.check_alive()
            claim = await self._claim(d, d.envelope)
            if claim.status == "done":
                return _stored(claim.result)
            attempts = claim.attempts
        raise self._gave_up(reason, error)

    def _gave_up(self, reason: str, error: str) -> InvalidRequest:
        return InvalidRequest(reason, f"{error} (gave up after {self._s.max_attempts} attempts)")

    def _result(self, envelope: Envelope, computed: worker.Computed) -> TrainingResult:
        if envelope.repo_id is None:  # identified from its headers: the body had it
            structlog.contextvars.bind_contextvars(repo_id=computed.computation.repo_id)
        # Validated in the worker: its fields taken as they are, not dumped and re-read.
        return TrainingResult.model_construct(
            **dict(computed.computation),
            request_id=envelope.request_id,
            status="ok",
            deployflag_version=__version__,
            finished_at=datetime.now(UTC),
        )

    def _start_job(self, d: Delivery, inline: bool) -> asyncio.Future[worker.Computed]:
        """The first try of ``d``'s job: in a worker, or (``inline``) here and now, its outcome
        in a future either way so that the flow after it is the same."""
        if not inline:
            return asyncio.ensure_future(self._run_job(d))
        job: asyncio.Future[worker.Computed] = asyncio.get_running_loop().create_future()
        try:
            job.set_result(worker.process(d.job(), self._s.training_task_name, self._config))
        except Exception as exc:
            job.set_exception(exc)
        self._metrics.inline_jobs.inc()
        return job

    async def _run_job(self, d: Delivery) -> worker.Computed:
        return await self._pool.run(
            worker.process,
            d.job(),
            self._s.training_task_name,
            self._config,
            time_limit=self._s.job_time_limit,
        )

    async def _in_pool(self, d: Delivery, fn: Callable[..., T], *args: Any) -> T:
        """A short pool call (no attempts to count): retried across pool rebuilds."""
        for _ in range(self._s.max_attempts):
            try:
                return await self._pool.run(fn, *args, time_limit=self._s.job_time_limit)
            except WorkerCrashed:
                d.check_alive()
            except JobTimeLimit as exc:
                raise InvalidRequest("time_limit", str(exc)) from None
        raise InvalidRequest("worker_crashed", "the worker died on every try")

    def _claim(self, d: Delivery, envelope: Envelope) -> Awaitable[Claim]:
        return self._database(
            "claim",
            d,
            lambda: self._store.claim(envelope.request_id, envelope.repo_id, envelope.body_digest),
        )

    # --- settling -----------------------------------------------------------------------------

    def _encode(self, d: Delivery, envelope: Envelope, result: TrainingResult) -> Reply:
        """The reply to ``result``, encoded once per delivery and kept on it."""
        if (kept := d.reply_to(result)) is not None:
            return kept
        reply = encode_reply(
            result,
            envelope.kind,
            reply_format=self._s.reply_format,
            task_name=self._s.result_task_name,
            origin=self._origin,
        )
        if len(reply.body) > self._s.max_message_bytes:
            raise InvalidRequest(
                "reply_too_large",
                f"the reply of {len(reply.body)} bytes exceeds DEPLOYFLAG_MAX_MESSAGE_BYTES",
            )
        d.keep_reply(result, reply)
        return reply

    async def _reply(self, d: Delivery, envelope: Envelope, result: TrainingResult) -> None:
        reply = self._encode(d, envelope, result)
        # A Celery producer always sets reply_to to its own result-backend queue: that names
        # where Celery task results go, not a deployflag reply queue, so Celery requests are
        # answered on the result queue.
        reply_to = d.message.reply_to if envelope.kind == "json" else None
        try:
            await self._broker(
                "publish",
                d,
                lambda: self._publisher.reply(
                    reply, correlation_id=envelope.request_id, reply_to=reply_to
                ),
            )
        except Unroutable as exc:
            raise InvalidRequest(
                "reply_unroutable", f"the reply could not be routed: {exc}"
            ) from None

    async def _park(self, d: Delivery, rejection: InvalidRequest) -> None:
        rid, repo_id = rejection.request_id, rejection.repo_id
        if rid is None and d.envelope is not None:  # decided after the envelope was known
            rid, repo_id = d.envelope.request_id, d.envelope.repo_id
        reason, error = rejection.reason, rejection.message
        log.warning("parking request", reason=reason, error=error, request_id=rid)
        if rid is not None and not isinstance(rejection, poison.Unrecorded):
            try:
                await d.trace.timed(
                    "record",
                    self._database(
                        "record", d, lambda: self._store.record_failure(rid, repo_id, reason, error)
                    ),
                )
            except InvalidRequest as refused:  # the database refuses this request's values too
                log.warning("parked without a record", error=refused.message, request_id=rid)
        await d.trace.timed(
            "publish",
            self._broker(
                "park",
                d,
                lambda: self._publisher.park(d.message, request_id=rid, reason=reason, error=error),
            ),
        )
        await d.ack()
        d.trace.settle(Outcome.PARKED, reason)

    # --- transient trouble --------------------------------------------------------------------

    async def _database(self, stage: str, d: Delivery, call: Callable[[], Awaitable[T]]) -> T:
        """A store call, retried while the database is unavailable; readiness follows it."""

        def failed(error: BaseException) -> None:
            mark_database(self._health, self._metrics, ok=False, error=str(error))
            d.trace.retried(stage)

        value = await self._retry(stage, d, call, (TransientError,), failed)
        mark_database(self._health, self._metrics, ok=True)
        return value

    async def _broker(self, stage: str, d: Delivery, call: Callable[[], Awaitable[T]]) -> T:
        """A publish, retried while the broker is in trouble."""
        retryable = (TransientError, *BROKER_ERRORS)
        return await self._retry(stage, d, call, retryable, lambda _: d.trace.retried(stage))

    def _retry(
        self,
        stage: str,
        d: Delivery,
        call: Callable[[], Awaitable[T]],
        retryable: tuple[type[BaseException], ...],
        on_failure: Callable[[BaseException], None],
    ) -> Awaitable[T]:
        return retry(
            call,
            stage=stage,
            retryable=retryable,
            backoff=self._backoff,
            stopping=self._stopping,
            check=d.check_alive,
            on_failure=on_failure,
        )


def _stored(result: dict[str, Any] | None) -> Answer:
    assert result is not None
    return Answer(TrainingResult.model_validate(result), Outcome.DUPLICATE)


def _bound(key: str) -> Any:
    return structlog.contextvars.get_contextvars().get(key)
