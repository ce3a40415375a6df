"""In-process stand-ins for what the message handler talks to: a delivery, the store, the worker
pool and the publisher. Each keeps a record of what was asked of it, and can be told to fail.

The store keeps real state (attempt counts, stored results) so claims and records behave as the
database does; the pool runs the real worker functions in this process unless told otherwise.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from deployflag.handler import MessageHandler
from deployflag.health import Health
from deployflag.messages import Reply, TrainingResult
from deployflag.metrics import Metrics
from deployflag.settings import Settings, load_settings
from deployflag.store import Claim, Folded

# An outcome a fake is told to produce: an exception to raise, or a callable run in its place.
Script = deque[BaseException | Callable[..., Any]]


def _next(script: Script) -> BaseException | Callable[..., Any] | None:
    return script.popleft() if script else None


@dataclass
class FakeChannel:
    is_closed: bool = False


@dataclass
class FakeMessage:
    """The parts of an aio-pika incoming message the handler reads, and its settlements."""

    body: bytes
    message_id: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    routing_key: str = "training"
    redelivered: bool = False
    timestamp: datetime | None = None
    channel: FakeChannel = field(default_factory=FakeChannel)
    processed: bool = False
    settled: list[str] = field(default_factory=list)  # "ack", "nack:requeue", "nack:drop"
    ack_error: BaseException | None = None

    async def ack(self) -> None:
        if self.ack_error is not None:
            raise self.ack_error
        self.settled.append("ack")
        self.processed = True

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append("nack:requeue" if requeue else "nack:drop")
        self.processed = True


class FakeStore:
    def __init__(self) -> None:
        self.attempts: dict[str, int] = defaultdict(int)
        self.results: dict[str, dict[str, Any]] = {}
        self.failures: list[tuple[str, str]] = []  # (request id, reason)
        self.claims: list[str] = []
        self.records: list[str] = []
        self.digests: dict[str, tuple[str, str | int | None]] = {}  # body digest, repo id
        self.claim_script: Script = deque()
        self.record_script: Script = deque()
        self.failure_script: Script = deque()
        self.folds: list[str] = []  # claim_and_record calls

    async def claim_and_record(
        self, result: TrainingResult, config: Any, body_digest: str | None, max_attempts: int
    ) -> Folded:
        self.folds.append(result.request_id)
        claim = await self.claim(result.request_id, result.repo_id, body_digest)
        if claim.status != "pending" or claim.attempts > max_attempts:
            return Folded(claim)
        fresh, stored = await self.record_result(result, config)
        return Folded(claim, recorded=fresh, stored=stored)

    async def claim(
        self, request_id: str, repo_id: str | int | None, body_digest: str | None = None
    ) -> Claim:
        self.claims.append(request_id)
        await _play(self.claim_script)
        known, known_repo = self.digests.setdefault(request_id, (body_digest or "", repo_id))
        if body_digest and known and known != body_digest:
            return Claim("conflict", self.attempts[request_id], known_repo_id=str(known_repo))
        if request_id in self.results:
            return Claim("done", self.attempts[request_id], self.results[request_id])
        self.attempts[request_id] += 1
        return Claim("pending", self.attempts[request_id])

    async def record_result(self, result: TrainingResult, config: Any) -> tuple[bool, Any]:
        self.records.append(result.request_id)
        await _play(self.record_script)
        stored = self.results.get(result.request_id)
        if stored is not None:
            return False, stored
        self.results[result.request_id] = result.model_dump(mode="json")
        return True, self.results[result.request_id]

    async def record_failure(
        self, request_id: str, repo_id: str | int | None, reason: str, error: str
    ) -> None:
        await _play(self.failure_script)
        self.failures.append((request_id, reason))


class FakePool:
    """Runs the job's function here, in this process, unless the script says otherwise."""

    def __init__(self) -> None:
        self.calls: list[str] = []  # function names, in order
        self.script: Script = deque()

    async def run(self, fn: Callable[..., Any], *args: Any, time_limit: float | None = None) -> Any:
        self.calls.append(fn.__name__)
        step = _next(self.script)
        if isinstance(step, BaseException):
            raise step
        if step is not None:
            value = step(*args)
            return await value if asyncio.iscoroutine(value) else value
        return fn(*args)


@dataclass
class Published:
    body: bytes
    correlation_id: str
    reply_to: str | None


class FakePublisher:
    def __init__(self) -> None:
        self.replies: list[Published] = []
        self.parked: list[tuple[str | None, str]] = []  # (request id, reason)
        self.reply_script: Script = deque()

    async def reply(self, reply: Reply, *, correlation_id: str, reply_to: str | None) -> None:
        await _play(self.reply_script)
        self.replies.append(Published(reply.body, correlation_id, reply_to))

    async def park(self, original: Any, *, request_id: str | None, reason: str, error: str) -> None:
        self.parked.append((request_id, reason))


async def _play(script: Script) -> None:
    step = _next(script)
    if isinstance(step, BaseException):
        raise step
    if step is not None:
        value = step()
        if asyncio.iscoroutine(value):
            await value


@dataclass
class Rig:
    """A handler wired to fakes, and the fakes, for one test."""

    settings: Settings
    store: FakeStore = field(default_factory=FakeStore)
    pool: FakePool = field(default_factory=FakePool)
    publisher: FakePublisher = field(default_factory=FakePublisher)
    metrics: Metrics = field(default_factory=lambda: Metrics(process_metrics=False))
    health: Health = field(default_factory=lambda: Health(database_ok=True))
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.handler = MessageHandler(
            self.settings,
            self.store,  # type: ignore[arg-type]
            self.pool,  # type: ignore[arg-type]
            self.publisher,  # type: ignore[arg-type]
            self.metrics,
            self.health,
            self.stopping,
            on_fatal=self._on_fatal,
        )

    def _on_fatal(self, error: BaseException) -> None:
        self.fatal.append(error)
        self.stopping.set()

    async def deliver(self, message: FakeMessage) -> FakeMessage:
        await self.handler(message)  # type: ignore[arg-type]
        return message

    def count(self, outcome: str, reason: str = "") -> float:
        value = self.metrics.registry.get_sample_value(
            "deployflag_requests_total", {"outcome": outcome, "reason": reason}
        )
        return value or 0.0

    def timed(self, stage: str) -> float:
        """How many deliveries observed ``stage`` in ``deployflag_stage_seconds``."""
        value = self.metrics.registry.get_sample_value(
            "deployflag_stage_seconds_count", {"stage": stage}
        )
        return value or 0.0


def rig(**overrides: Any) -> Rig:
    base: dict[str, Any] = {
        "retry_backoff_initial": 0.001,
        "retry_backoff_max": 0.002,
        "max_attempts": 3,
        "reply_format": "auto",
        # Every job through the fake pool, unless a test is about the ones run in the handler.
        "inline_job_max_bytes": 0,
    }
    return Rig(load_settings(**(base | overrides)))
