"""Broker resource alarms: a memory or disk alarm raised for 30 s while requests are in flight.

RabbitMQ answers an alarm by blocking every publishing connection (``connection.blocked``) and
reading nothing more from it: the service's replies, acks and nacks wait. The deliveries it holds
stay unacked (safe on the broker), it takes no more than its prefetch, /readyz and
``deployflag_broker_blocked`` say "broker blocked", and it resumes by itself when the alarm
clears: every request answered once, none lost, none trained twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally, in_flight, metadata_ids, metric
from tests.faults.node import BrokerNode
from tests.support.broker import Names, ServiceProcess
from tests.support.toolkit import async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
ALARM_SECONDS = 30.0
REQUESTS = 120
PREFETCH = 4

# (raise, clear) per alarm kind, as rabbitmqctl arguments.
ALARMS = {
    "memory": (
        ("set_vm_memory_high_watermark", "0.0000001"),
        ("set_vm_memory_high_watermark", "0.4"),
    ),
    "disk": (("set_disk_free_limit", "1000000GB"), ("set_disk_free_limit", "50MB")),
}


def blocked_state(service: ServiceProcess) -> tuple[float | None, str | None]:
    answer = service.readyz()
    reason = None if answer is None else answer[1].get("reason")
    return metric(service, "deployflag_broker_blocked"), reason


@pytest.mark.parametrize("kind", sorted(ALARMS))
async def test_a_30_second_resource_alarm_with_requests_in_flight(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    broker: BrokerNode,
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
    kind: str,
) -> None:
    raise_args, clear_args = ALARMS[kind]
    async with Tally(rabbit_url, names) as tally:
        # Published and confirmed before the alarm, which blocks the test's publishing
        # connection too; the service starts into the alarm, so every request it takes is in
        # flight while the broker blocks it.
        for i in range(REQUESTS):
            await tally.publish(WORKED, message_id=f"req-{i:03d}")
        held_max = 0
        try:
            await asyncio.to_thread(broker.ctl, *raise_args)
            service = start_service(
                service_env,
                ready=False,
                DEPLOYFLAG_WORKERS="2",
                DEPLOYFLAG_PREFETCH=str(PREFETCH),
            )
            await async_wait_until(
                lambda: blocked_state(service) == (1.0, "broker blocked"),
                60,
                "the service to report the broker blocked",
            )
            blocked_at = time.monotonic()
            while time.monotonic() - blocked_at < ALARM_SECONDS:
                held_max = max(held_max, in_flight(service))
                assert blocked_state(service)[0] == 1.0
                await asyncio.sleep(0.5)  # sampling interval of the in-flight gauge
            assert held_max > 0, "requests were in flight during the alarm"
            # Nothing got out while blocked.
            assert sum(tally.replies.values()) == 0
        finally:
            await asyncio.to_thread(broker.ctl, *clear_args)
        await async_wait_until(
            lambda: blocked_state(service)[0] == 0.0, 60, "the service to report unblocked"
        )
        await tally.settle(timeout=180)
        await async_wait_until(service.is_ready, 30, "the service ready again")
        rows = await metadata_ids(service_env["DEPLOYFLAG_DATABASE_URL"])
        row = fault_table.add(
            tally.row(
                f"{kind} alarm for {ALARM_SECONDS:.0f} s with requests in flight "
                f"(held at most {held_max} unacked, prefetch {PREFETCH})",
                rows,
                [service],
            )
        )
    assert 0 <= held_max <= PREFETCH, "no more work than the prefetch piled up"
    print(row)  # shown with -rA; the table is written by make test-faults
    assert row.lost == 0
    assert row.duplicates == 0
    assert (row.sent, row.replies, row.rows, row.parked) == (REQUESTS, REQUESTS, REQUESTS, 0)
