"""b., c. and the consumer timeout: the broker and the database go away and come back.

b. RabbitMQ ``stop_app`` / ``start_app`` in the middle of a stream of 500 requests; the publisher
   re-publishes (same message_id) whatever the broker did not confirm.
c. PostgreSQL stopped for 20 s in the middle of a stream: nothing is acked meanwhile, nothing is
   parked for it, everything is answered once it is back.
i. the broker closes the consumer's channel under a job that runs past ``consumer_timeout``;
   the service reopens it, re-registers its consumer and answers the request once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally, consumers_of, finished_lines, queue_counts
from tests.faults.node import BrokerNode
from tests.support.broker import Names, ServiceProcess
from tests.support.payloads import SLOW_TRAINING
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
DATABASE_DOWN_SECONDS = 20.0
DEFAULT_CONSUMER_TIMEOUT_MS = 1_800_000
DEFAULT_CHANNEL_TICK_MS = 60_000


def database_ok(service: ServiceProcess) -> bool | None:
    answer = service.readyz()
    return None if answer is None else bool(answer[1]["checks"]["database"])


async def test_broker_stopped_and_started_during_a_stream_of_500(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    broker: BrokerNode,
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    service = start_service(service_env, DEPLOYFLAG_WORKERS="2")
    async with Tally(rabbit_url, names) as tally:

        async def stream() -> None:
            for i in range(500):
                await tally.publish(WORKED, message_id=f"req-{i:03d}", patience=180)
                await asyncio.sleep(0.02)  # a stream of about fifty a second, not a burst

        publisher = asyncio.create_task(stream())
        try:
            await async_wait_until(lambda: len(tally.sent) >= 150, 60, "150 requests confirmed")
            try:
                await asyncio.to_thread(broker.stop_app)
                await async_wait_until(
                    lambda: not service.is_ready(), 30, "the service to notice the broker gone"
                )
                assert not publisher.done(), "the stream ended before the outage"
            finally:
                await asyncio.to_thread(broker.start_app)
            await asyncio.wait_for(publisher, timeout=180)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        await async_wait_until(service.is_ready, 90, "the service to be ready again")
        await tally.settle(timeout=240)
        _, consumers = await queue_counts(rabbit_url, names.queue("training"))
        await fault_table.record(
            tally,
            f"b. broker stop_app/start_app mid-stream ({tally.republished} publishes retried)",
            [service],
            sent=500,
            replies=500,
            rows=500,
            parked=0,
        )
    # Re-registered after the restart (with the burst window's, when it is open).
    assert consumers == consumers_of(service), "the consumers were re-registered"


async def test_database_down_for_20_seconds_during_a_stream(
    start_service: Callable[..., ServiceProcess],
    pg_env: dict[str, str],
    postgres: PostgresCluster,
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    service = start_service(pg_env, DEPLOYFLAG_WORKERS="2")
    async with Tally(rabbit_url, names) as tally:

        async def stream() -> None:
            for i in range(300):
                await tally.publish(WORKED, message_id=f"req-{i:03d}")
                await asyncio.sleep(0.1)  # a steady stream of ten a second, not a burst

        publisher = asyncio.create_task(stream())
        try:
            await async_wait_until(lambda: len(tally.replies) >= 30, 60, "30 replies")
            try:
                await asyncio.to_thread(postgres.stop)
                down_since = time.monotonic()
                await async_wait_until(
                    lambda: database_ok(service) is False, 30, "readiness to report database down"
                )
                replies_when_noticed = len(tally.replies)
                # The outage itself: the database stays down this long.
                await asyncio.sleep(
                    max(0.0, DATABASE_DOWN_SECONDS - (time.monotonic() - down_since))
                )
                replies_before_restart = len(tally.replies)
                assert not publisher.done(), "the stream ended before the outage did"
            finally:
                await asyncio.to_thread(postgres.start)
            await asyncio.wait_for(publisher, timeout=120)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        assert replies_before_restart == replies_when_noticed, "replies while the database was down"
        assert not tally.parked, "requests parked because of the outage"
        await async_wait_until(lambda: database_ok(service), 60, "readiness: database back")
        await tally.settle(timeout=180)
        await fault_table.record(
            tally,
            "c. PostgreSQL down 20 s mid-stream",
            [service],
            replies=300,
            rows=300,
            parked=0,
        )
    assert service.is_ready()


async def test_job_past_the_consumer_timeout_is_answered_once(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    broker: BrokerNode,
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    # RabbitMQ 3.10 reads consumer_timeout when a channel opens, and checks it on the channel's
    # tick (every minute by default): set both before the service opens its channel.
    broker.eval("application:set_env(rabbit, consumer_timeout, 1000).")
    broker.eval("application:set_env(rabbit, channel_tick_interval, 500).")
    try:
        service = start_service(service_env, DEPLOYFLAG_WORKERS="1", **SLOW_TRAINING)
        async with Tally(rabbit_url, names) as tally:
            await tally.publish(large_payload, message_id="slow")
            for i in range(5):
                await tally.publish(WORKED, message_id=f"quick-{i}")
            await tally.settle(timeout=180)
            requeued = [line for line in finished_lines([service]) if line["outcome"] == "requeued"]
            _, consumers = await queue_counts(rabbit_url, names.queue("training"))
            row = await fault_table.record(
                tally,
                "i. consumer_timeout (1 s) closes the channel mid-job",
                [service],
            )
    finally:
        broker.eval(
            f"application:set_env(rabbit, consumer_timeout, {DEFAULT_CONSUMER_TIMEOUT_MS})."
        )
        broker.eval(
            f"application:set_env(rabbit, channel_tick_interval, {DEFAULT_CHANNEL_TICK_MS})."
        )
    assert row.replies + row.parked == 6
    # The broker did close the channel under the job …
    log = broker.log_text()
    if log is not None:
        assert "timed out waiting for delivery acknowledgement" in log
    assert requeued, "no delivery was handed back by a closed channel"
    # … and the service reopened it and consumes again.
    assert consumers == consumers_of(service)
    assert service.is_ready()
