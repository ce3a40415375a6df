"""What every fault scenario counts, and the probes it uses on the services under test.

A scenario publishes a known set of requests through a :class:`Tally`, does its damage, waits
until every request is answered or parked, and turns the counts into a :class:`FaultRow`:

* **sent** — request ids whose publish the broker confirmed;
* **replies** — distinct correlation ids among them seen on the result queue;
* **rows** — distinct request ids among them in ``model_performance_metadata``;
* **parked** — distinct message ids among them seen on the failed queue;
* **lost** — sent, neither answered nor parked (must be 0);
* **duplicates** — request ids with more than one ``outcome=ok`` line across all the services'
  logs: trained and recorded more than once (must be 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import psutil
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.support.broker import Names, ServiceProcess
from tests.support.toolkit import async_wait_until, request_message
from tests.support.toolkit import metric as read_metric

QUEUE_KINDS = ("collect_data", "training", "save_result", "failed")


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    sent: int
    replies: int
    rows: int
    parked: int
    lost: int
    duplicates: int
    seconds: float


@dataclass
class ParkedCopy:
    message_id: str
    reason: str
    error: str
    request_id: str | None
    headers: dict[str, Any]


@dataclass
class Tally:
    """The upstream's side of a scenario: publishes with confirms, collects what comes back.

    Its connection is robust and its consumers ack only after counting, so it keeps counting
    across a broker restart without losing a reply.
    """

    url: str
    names: Names
    queue_arguments: dict[str, Any] | None = None  # {"x-queue-type": "quorum"} on a cluster
    sent: dict[str, None] = field(default_factory=dict)  # ordered set of request ids
    replies: Counter[str] = field(default_factory=Counter)
    parked: dict[str, ParkedCopy] = field(default_factory=dict)
    republished: int = 0  # publishes retried because the broker did not confirm them
    started: float = field(default_factory=time.monotonic)

    async def __aenter__(self) -> Tally:
        self.connection: AbstractRobustConnection = await aio_pika.connect_robust(
            self.url, reconnect_interval=0.5
        )
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(
            self.names.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for kind in QUEUE_KINDS:
            queue = await self.channel.declare_queue(
                self.names.queue(kind), durable=True, arguments=self.queue_arguments
            )
            await queue.bind(self.exchange, self.names.queue(kind))
        self.consume_channel = await self.connection.channel()
        await self.consume_channel.set_qos(prefetch_count=200)
        results = await self.consume_channel.declare_queue(
            self.names.queue("save_result"), durable=True, arguments=self.queue_arguments
        )
        failed = await self.consume_channel.declare_queue(
            self.names.queue("failed"), durable=True, arguments=self.queue_arguments
        )
        await results.consume(self._on_reply)
        await failed.consume(self._on_parked)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 10)

    # --- collecting ---------------------------------------------------------------------------

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.correlation_id:
            self.replies[message.correlation_id] += 1
        await message.ack()

    async def _on_parked(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        rid = headers.get("x-deployflag-request-id")
        key = message.message_id or (str(rid) if rid else "")
        self.parked[key] = ParkedCopy(
            message_id=key,
            reason=str(headers.get("x-deployflag-reason")),
            error=str(headers.get("x-deployflag-error")),
            request_id=None if rid is None else str(rid),
            headers=headers,
        )
        await message.ack()

    # --- publishing ---------------------------------------------------------------------------

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        reply_to: str | None = None,
        patience: float = 0.0,
    ) -> None:
        """Publish and wait for the broker's confirm; count the id as sent only then.

        With ``patience``, a publish that fails or is not confirmed (broker down, connection
        lost) is re-published with the same message_id until confirmed or ``patience`` seconds
        have passed: the service recognises a copy by its id.
        """
        deadline = time.monotonic() + patience
        while True:
            message = request_message(body, message_id, headers, content_type, reply_to)
            try:
                # aiormq's timeout does not cover writing the frames, which can hang for ever
                # on a connection that died under the publish: bound the whole call.
                await asyncio.wait_for(
                    self.exchange.publish(
                        message, routing_key=self.names.queue("training"), timeout=10
                    ),
                    10,
                )
            except (DeliveryError, Exception):
                if time.monotonic() > deadline:
                    raise
                self.republished += 1
                await asyncio.sleep(0.2)  # back off before the next try
                continue
            self.sent[message_id] = None
            return

    # --- waiting and counting -----------------------------------------------------------------

    def unanswered(self) -> set[str]:
        return set(self.sent) - set(self.replies) - set(self.parked)

    async def settle(self, timeout: float, what: str = "every request answered or parked") -> None:
        await async_wait_until(lambda: not self.unanswered(), timeout=timeout, what=what)

    def row(
        self, scenario: str, metadata_ids: Iterable[str], services: Sequence[ServiceProcess]
    ) -> FaultRow:
        sent = set(self.sent)
        answered = sent & set(self.replies)
        parked = sent & set(self.parked)
        oks = ok_counts(services)
        return FaultRow(
            scenario=scenario,
            sent=len(sent),
            replies=len(answered),
            rows=len(sent & set(metadata_ids)),
            parked=len(parked),
            lost=len(sent - answered - parked),
            duplicates=sum(1 for rid in sent if oks[rid] > 1),
            seconds=round(time.monotonic() - self.started, 1),
        )


# --- the services' own records --------------------------------------------------------------


def finished_lines(services: Iterable[ServiceProcess]) -> list[dict[str, Any]]:
    """Every "request finished" line of every service, in log order per service."""
    return [
        line
        for service in services
        for line in service.log_lines()
        if line.get("event") == "request finished"
    ]


def ok_counts(services: Iterable[ServiceProcess]) -> Counter[str]:
    """How often each request id was finished with outcome ok (trained and recorded)."""
    return Counter(
        str(line.get("request_id")) for line in finished_lines(services) if line["outcome"] == "ok"
    )


async def metadata_ids(database_url: str) -> set[str]:
    """Request ids in model_performance_metadata (SQLite or PostgreSQL)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT request_id FROM model_performance_metadata"))
            return {str(row[0]) for row in rows}
    finally:
        await engine.dispose()


async def request_row(database_url: str, request_id: str) -> dict[str, Any] | None:
    """The training_request row of one request id."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT * FROM training_request WHERE request_id = :rid"),
                    {"rid": request_id},
                )
            ).first()
            return None if row is None else dict(row._mapping)
    finally:
        await engine.dispose()


def metric(service: ServiceProcess, name: str, **labels: str) -> float | None:
    """One sample from the service's /metrics (None when the service or the series is not there)."""
    return read_metric(service.http_port, name, **labels)


def consumers_of(service: ServiceProcess) -> int:
    """The consumers one instance keeps on the training queue: its own, and the burst window's
    while that is open."""
    name = "deployflag_burst_window_changes_total"
    opened = metric(service, name, change="opened") or 0.0
    closed = metric(service, name, change="closed") or 0.0
    return 1 + int(opened > closed)


def in_flight(service: ServiceProcess) -> int:
    value = metric(service, "deployflag_in_flight")
    return -1 if value is None else int(value)


# --- processes ------------------------------------------------------------------------------


def pool_workers(service: ServiceProcess) -> list[psutil.Process]:
    """The service's pool workers: the children of its forkserver (not the forkserver itself,
    not the resource tracker)."""
    assert service.proc is not None
    workers: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(service.proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if "multiprocessing.forkserver" in " ".join(child.cmdline()):
                    workers.extend(p for p in child.children() if p.is_running())
    return workers


def busy_worker(service: ServiceProcess, min_cpu_seconds: float) -> psutil.Process | None:
    """A pool worker that has used at least ``min_cpu_seconds`` of CPU (is training)."""
    for worker in pool_workers(service):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = worker.cpu_times()
            if times.user + times.system >= min_cpu_seconds:
                return worker
    return None


def descendants(service: ServiceProcess) -> list[psutil.Process]:
    assert service.proc is not None
    try:
        return list(psutil.Process(service.proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


async def queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, asked on a connection of its own (a robust
    channel answers a passive declare of a queue it knows from its cache)."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await connection.close()
