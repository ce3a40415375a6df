"""The failed queue for operators: read it without losing anything, replay from it, purge it.

Every command takes the parked messages with ``basic.get`` and no auto-ack, so nothing leaves the
queue until it is deliberately acked: what is only read is handed back with ``nack(requeue=True)``
(and a dropped connection hands back whatever was still held). A replayed message is acked only
after the broker confirmed its copy on the training queue, so an interruption at any point can
duplicate a request, never lose one; and the park history in the database notes a confirmed
replay, so a re-run after an interruption between the confirm and the ack does not publish it
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import DeliveryError, PublishError

from deployflag.broker.connection import connect
from deployflag.settings import Settings

HEADER_PREFIX = "x-deployflag-"
REPLAY_HEADER = "x-deployflag-replays"  # how many times this request was replayed
PUBLISH_TIMEOUT = 30.0
PEEK_BYTES = 1 << 20  # bodies up to this size are parsed to show the repo id
GET_TIMEOUT = 10.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ReplayError(Exception):
    """The broker refused or did not confirm a republished copy: nothing was acked."""


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` → a timedelta (ValueError otherwise)."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30m, 12h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _peek(body: bytes, headers: dict[str, Any]) -> tuple[str, str | None]:
    """The envelope kind and the repo id, read tolerantly from a parked body."""
    kind = "celery" if "task" in headers else "json"
    if len(body) > PEEK_BYTES:
        return kind, None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "not-json", None
    request: Any = data
    if isinstance(data, list) and data and isinstance(data[0], list) and data[0]:
        request = data[0][0]  # Celery protocol 2: [args, kwargs, embed]
    elif isinstance(data, dict) and "task" in data and "args" in data:
        kind = "celery-v1"
        args = data.get("args")
        request = args[0] if isinstance(args, list) and args else None
    repo = request.get("repo_id") if isinstance(request, dict) else None
    return kind, None if repo is None else str(repo)


@dataclass(eq=False)  # compared by identity: two parked copies may look alike
class Parked:
    """One message held from the failed queue, and what its headers say about the park."""

    message: AbstractIncomingMessage
    request_id: str | None
    repo_id: str | None
    reason: str
    error: str
    size: int
    kind: str
    parked_at: datetime | None
    replays: int

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Parked:
        headers = dict(message.headers or {})
        kind, repo_id = _peek(message.body, headers)
        replays = headers.get(REPLAY_HEADER)
        return cls(
            message=message,
            request_id=_text(headers.get("x-deployflag-request-id")),
            repo_id=repo_id,
            reason=_text(headers.get("x-deployflag-reason")) or "unknown",
            error=_text(headers.get("x-deployflag-error")) or "",
            size=len(message.body),
            kind=kind,
            parked_at=_parse_time(headers.get("x-deployflag-parked-at")) or message.timestamp,
            replays=replays if isinstance(replays, int) else 0,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "repo_id": self.repo_id,
            "reason": self.reason,
            "error": self.error,
            "size": self.size,
            "kind": self.kind,
            "parked_at": None if self.parked_at is None else self.parked_at.isoformat(),
            "replays": self.replays,
        }


@dataclass(frozen=True)
class Selection:
    """Which parked messages a command acts on (all of them when nothing is set)."""

    reasons: frozenset[str] = frozenset()
    request_ids: frozenset[str] = frozenset()
    older_than: timedelta | None = None

    def __call__(self, parked: Parked) -> bool:
        if self.reasons and parked.reason not in self.reasons:
            return False
        if self.request_ids and parked.request_id not in self.request_ids:
            return False
        if self.older_than is not None:
            if parked.parked_at is None:
                return False
            return parked.parked_at < datetime.now(UTC) - self.older_than
        return True


def counts_by_reason(parked: Iterable[Parked]) -> list[tuple[str, int]]:
    counts = Counter(p.reason for p in parked)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


class FailedQueue:
    """A connection to the broker holding the failed queue's messages while a command runs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._held: dict[int, Parked] = {}  # by id(): settled ones leave in O(1)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[FailedQueue]:
        connection = await connect(self._settings, name="failed")
        try:
            self._channel: AbstractChannel = await connection.channel(publisher_confirms=True)
            self._queue: AbstractQueue = await self._channel.declare_queue(
                self._settings.failed_queue, passive=True
            )
            try:
                yield self
            finally:
                await self.release_all()
        finally:
            await connection.close()

    async def fetch_all(self) -> list[Parked]:
        """Take every message on the queue, unacked: they stay the broker's until settled."""
        while True:
            message = await self._queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
            if message is None:
                return list(self._held.values())
            parked = Parked.of(message)
            self._held[id(parked)] = parked

    async def release(self, parked: Parked) -> None:
        """Hand a message back to the queue untouched."""
        await parked.message.nack(requeue=True)
        del self._held[id(parked)]

    async def release_all(self) -> None:
        for parked in list(self._held.values()):
            with contextlib.suppress(Exception):  # a closed channel requeues them by itself
                await self.release(parked)
        self._held.clear()

    async def drop(self, parked: Parked) -> None:
        await parked.message.ack()
        del self._held[id(parked)]

    async def republish(self, parked: Parked) -> None:
        """Publish the original request to the training queue and wait for the confirm."""
        original = parked.message
        headers = {
            key: value
            for key, value in (original.headers or {}).items()
            if not key.startswith(HEADER_PREFIX)
        }
        headers[REPLAY_HEADER] = parked.replays + 1
        copy = aio_pika.Message(
            body=original.body,
            headers=headers,
            content_type=original.content_type,
            content_encoding=original.content_encoding,
            correlation_id=original.correlation_id,
            message_id=original.message_id,
            reply_to=original.reply_to,
            priority=original.priority,
            type=original.type,
            app_id=original.app_id,
            timestamp=original.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        exchange = await self._channel.get_exchange(self._settings.exchange, ensure=False)
        try:
            await asyncio.wait_for(
                exchange.publish(
                    copy,
                    routing_key=self._settings.training_queue,
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT,
                ),
                PUBLISH_TIMEOUT,
            )
        except (DeliveryError, PublishError, TimeoutError) as exc:
            raise ReplayError(
                f"the training queue did not take request {parked.request_id}: {exc}"
            ) from None
