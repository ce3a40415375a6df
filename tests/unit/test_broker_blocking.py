"""The blocked-connection watcher reads aiormq's private state: fail loudly if aiormq changes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiormq

from deployflag.broker import blocking
from deployflag.health import Health
from deployflag.metrics import Metrics
from tests.support.toolkit import async_wait_until


async def test_aiormq_still_keeps_the_unblocked_event_where_the_watcher_reads_it() -> None:
    connection = aiormq.Connection("amqp://guest:guest@127.0.0.1:1/")
    assert isinstance(getattr(connection, blocking._UNBLOCKED), asyncio.Event)


async def test_the_watcher_mirrors_the_state_into_health_and_metrics() -> None:
    event = asyncio.Event()
    amqp = SimpleNamespace(is_opened=True, **{blocking._UNBLOCKED: event})
    connection = SimpleNamespace(transport=SimpleNamespace(connection=amqp))
    health, metrics = Health(), Metrics(process_metrics=False)
    assert blocking.is_blocked(connection) is True  # type: ignore[arg-type]
    task = asyncio.create_task(
        blocking.watch_blocked(connection, health, metrics, interval=0.01)  # type: ignore[arg-type]
    )
    try:
        await async_wait_until(lambda: health.broker_blocked, 5, "the blocked state")
        assert metrics.broker_blocked._value.get() == 1
        event.set()
        await async_wait_until(lambda: not health.broker_blocked, 5, "the unblocked state")
        assert metrics.broker_blocked._value.get() == 0
    finally:
        task.cancel()
    assert blocking.is_blocked(SimpleNamespace(transport=None)) is None  # type: ignore[arg-type]
