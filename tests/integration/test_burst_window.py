"""The burst window against the real RabbitMQ: a second consumer while requests are short.

Each test watches the broker's own consumer count on the training queue and the service's
``deployflag_prefetch_window``, and checks that every request is answered (exactly once through
opening, closing and a drain; at least once, and trained once, when the broker cuts the
connection) .
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from deployflag.handler import INLINE_DECODE_BYTES
from tests.integration.test_service import metadata_rows
from tests.support.broker import Names, ServiceProcess, Upstream
from tests.support.toolkit import async_wait_until, metric, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
LARGE = orjson.dumps({**orjson.loads(WORKED), "padding": "p" * (INLINE_DECODE_BYTES + 1)})
WORKERS = 2  # prefetch 2, burst window 6 by default
OPEN = WORKERS + 3 * WORKERS  # the window while the burst consumer is subscribed
# Every worked example counts as short, however loaded the machine: a slow one would close the
# window (that timing rule is the policy's unit tests' to pin), so here only a large body does.
SHORT_SECONDS = "30"


def serve(
    start_service: Callable[..., ServiceProcess], service_env: dict[str, str], **extra: str
) -> ServiceProcess:
    return start_service(
        service_env,
        DEPLOYFLAG_WORKERS=str(WORKERS),
        DEPLOYFLAG_BURST_SHORT_SECONDS=SHORT_SECONDS,
        **extra,
    )


def window(service: ServiceProcess) -> float | None:
    return metric(service.http_port, "deployflag_prefetch_window")


def opened(service: ServiceProcess) -> float:
    value = metric(service.http_port, "deployflag_burst_window_changes_total", change="opened")
    return value or 0.0


async def publish_many(upstream: Upstream, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    for rid in ids:
        await upstream.publish(WORKED, message_id=rid)
    return ids


async def answered_once(upstream: Upstream, ids: list[str], timeout: float = 120) -> None:
    """Every id has exactly one reply, and no other reply is waiting."""
    replies = await upstream.drain("save_result", len(ids), timeout=timeout)
    got = sorted(r.correlation_id or "" for r in replies)
    assert got == sorted(ids)
    assert await upstream.count("save_result") == 0


async def consumers_are(upstream: Upstream, count: int) -> bool:
    return await upstream.consumers("training") == count


async def answered(upstream: Upstream, ids: list[str], timeout: float = 120) -> Counter[str]:
    """Replies until every id has one; how many each got (a reply whose ack the broker never
    saw is sent again by the redelivered copy, from the stored result)."""
    replies: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    while not set(ids) <= set(replies):
        assert time.monotonic() < deadline, f"unanswered: {sorted(set(ids) - set(replies))}"
        [reply] = await upstream.drain("save_result", 1, timeout=timeout)
        replies[reply.correlation_id or ""] += 1
    return replies


def trained_once(service: ServiceProcess, ids: list[str]) -> None:
    """No id was trained twice (one ``ok`` at most; a redelivered copy of a recorded request
    ends ``duplicate``), and each has exactly one metadata row."""
    oks = Counter(
        line.get("request_id")
        for line in service.log_lines()
        if line.get("event") == "request finished" and line.get("outcome") == "ok"
    )
    assert {rid: n for rid, n in oks.items() if n > 1} == {}
    rows = Counter(row[0] for row in metadata_rows(service.env))
    assert {rid: rows[rid] for rid in ids if rows[rid] != 1} == {}


async def wait_open(service: ServiceProcess, upstream: Upstream) -> None:
    await async_wait_until(
        lambda: window(service) == OPEN, timeout=60, what="the burst window to open"
    )
    await async_wait_until(
        lambda: consumers_are(upstream, 2), timeout=30, what="the broker to list two consumers"
    )


async def streaming_with_the_window_open(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> tuple[ServiceProcess, list[str], list[str]]:
    """A service whose burst window opened on 40 short requests (all answered), then 300 more
    published and their replies flowing: (the service, the 40 ids, the 300 ids)."""
    service = serve(start_service, service_env)
    warm = await publish_many(upstream, "warm", 40)
    await answered_once(upstream, warm)
    await wait_open(service, upstream)
    ids = await publish_many(upstream, "stream", 300)
    await async_wait_until(
        lambda: upstream.count("save_result"), timeout=60, what="replies to flow"
    )
    return service, warm, ids


async def test_opens_for_short_requests_and_closes_for_a_large_body(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    rabbit_url: str,
    names: Names,
) -> None:
    service = serve(start_service, service_env)
    # Closed at start: one consumer, the base window.
    assert window(service) == WORKERS
    assert await upstream.consumers("training") == 1
    # A run of short requests opens it...
    ids = await publish_many(upstream, "short", 60)
    await answered_once(upstream, ids)
    await wait_open(service, upstream)
    assert opened(service) == 1
    # The second consumer ranks below any plain one: an idle instance is served first.
    vhost = rabbit_url.rsplit("/", 1)[1]
    assert await asyncio.to_thread(consumer_priorities, vhost, names.queue("training")) == [
        None,
        -1,
    ]
    # ...and a body larger than a small request's closes it.
    await upstream.publish(LARGE, message_id="large")
    await async_wait_until(lambda: window(service) == WORKERS, timeout=60, what="it to close")
    await async_wait_until(
        lambda: consumers_are(upstream, 1), timeout=30, what="the broker to list one consumer"
    )
    await answered_once(upstream, ["large"])
    closed = metric(service.http_port, "deployflag_burst_window_changes_total", change="closed")
    assert closed == 1


async def test_turned_off_it_never_opens(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service = serve(start_service, service_env, DEPLOYFLAG_BURST_PREFETCH="0")
    ids = await publish_many(upstream, "short", 60)
    await answered_once(upstream, ids)
    assert window(service) == WORKERS
    assert opened(service) == 0
    assert await upstream.consumers("training") == 1


async def test_a_drain_with_the_window_open_loses_nothing(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    first, _, ids = await streaming_with_the_window_open(start_service, service_env, upstream)
    # SIGTERM while a backlog streams through both consumers.
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=90) == 0
    # What the first did not finish is back in the queue; a second instance answers it.
    serve(start_service, service_env)
    await answered_once(upstream, ids)
    assert await upstream.count("training") == 0


async def test_a_connection_cut_with_the_window_open_loses_nothing_and_it_still_closes(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    rabbit_url: str,
) -> None:
    service, warm, ids = await streaming_with_the_window_open(start_service, service_env, upstream)
    # The broker closes the service's connection mid-stream: both consumers go, the robust
    # connection restores them, and every unacked delivery comes back to one of them.
    vhost = rabbit_url.rsplit("/", 1)[1]
    await asyncio.to_thread(close_service_connections, vhost)
    replies = await answered(upstream, ids)
    trained_once(service, ids)
    assert set(replies) <= {*ids, *warm}
    await async_wait_until(service.is_ready, timeout=60, what="the service ready again")
    # The restored burst consumer is still the service's to cancel.
    large = f"large-{uuid.uuid4().hex[:6]}"
    await upstream.publish(LARGE, message_id=large)
    await async_wait_until(
        lambda: consumers_are(upstream, 1), timeout=60, what="the broker to list one consumer"
    )
    assert window(service) == WORKERS
    await answered(upstream, [large])


def close_service_connections(vhost: str) -> None:
    listing = rabbitmqctl(
        "list_connections", "-p", vhost, "--no-table-headers", "pid", "client_properties"
    )
    pids = [line.split()[0] for line in listing.splitlines() if "deployflag-serve" in line]
    assert pids, f"no service connection in:\n{listing}"
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: cut the service off")


def consumer_priorities(vhost: str, queue: str) -> list[int | None]:
    """Each consumer's x-priority on ``queue`` (None: none given), sorted with None first."""
    listing = rabbitmqctl(
        "list_consumers", "-p", vhost, "--no-table-headers", "queue_name", "arguments"
    )
    found: list[int | None] = []
    for line in listing.splitlines():
        if line.split("\t", 1)[0] != queue:
            continue
        match = re.search(r"x-priority\D*?(-?\d+)", line)
        found.append(int(match.group(1)) if match else None)
    return sorted(found, key=lambda p: (p is not None, p or 0))
