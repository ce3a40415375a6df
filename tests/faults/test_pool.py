"""d. and e. The training processes: killed, over the time limit, out of memory.

A pool worker is a child of the service's forkserver; psutil finds it, and CPU time tells when it
is training (a fresh worker has used next to none). One worker per service, so there is no doubt
about which process runs the request.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import (
    Tally,
    busy_worker,
    finished_lines,
    metric,
    request_row,
)
from tests.support.broker import Names, ServiceProcess
from tests.support.payloads import SLOW_TRAINING
from tests.support.toolkit import async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
TRAINING_CPU = 1.0  # CPU seconds after which a fresh worker is surely computing, not parsing
# A pool worker maps about 350 MB once numpy and scikit-learn are loaded (VmSize, measured);
# the large plain JSON payload (41 MB) needs 8 x its size more (worker.JSON_REQUEST_SPACE_FACTOR),
# the worked example (2 kB) next to nothing. 512 MiB parks the one and serves the other.
MEMORY_LIMIT = str(512 * 1024 * 1024)


async def kill_training_worker(service: ServiceProcess, killed: list[int]) -> int:
    """Wait until a worker not killed before is training, SIGKILL it, return its pid."""
    worker = await async_wait_until(
        lambda: (w := busy_worker(service, TRAINING_CPU)) and w.pid not in killed and w,
        timeout=120,
        what="a pool worker to be training",
        every=0.1,
    )
    worker.send_signal(signal.SIGKILL)
    killed.append(worker.pid)
    return int(worker.pid)


def attempt_failures(service: ServiceProcess) -> list[str]:
    return [
        str(line.get("reason"))
        for line in service.log_lines()
        if line.get("event") == "attempt failed"
    ]


async def test_worker_killed_mid_training_is_replaced_and_the_request_retried(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    service = start_service(service_env, DEPLOYFLAG_WORKERS="1", **SLOW_TRAINING)
    killed: list[int] = []
    async with Tally(rabbit_url, names) as tally:
        await tally.publish(large_payload, message_id="killed-once")
        await kill_training_worker(service, killed)
        await tally.settle(timeout=180)
        await fault_table.record(
            tally,
            "d. pool worker SIGKILLed mid-training",
            [service],
            replies=1,
            rows=1,
            parked=0,
        )
    # The pool was rebuilt once, the attempt counted, and the second attempt answered.
    assert metric(service, "deployflag_pool_rebuilds_total", cause="crash") == 1
    assert attempt_failures(service) == ["worker_crashed"]
    stored = await request_row(service_env["DEPLOYFLAG_DATABASE_URL"], "killed-once")
    assert stored is not None
    assert (stored["status"], stored["attempts"]) == ("done", 2)
    assert service.is_ready()


async def test_worker_killed_on_every_attempt_parks_the_request(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    service = start_service(
        service_env, DEPLOYFLAG_WORKERS="1", DEPLOYFLAG_MAX_ATTEMPTS="2", **SLOW_TRAINING
    )
    killed: list[int] = []
    async with Tally(rabbit_url, names) as tally:
        await tally.publish(large_payload, message_id="killed-always")
        for _ in range(2):
            await kill_training_worker(service, killed)
        await tally.settle(timeout=120)
        assert tally.parked["killed-always"].reason == "worker_crashed"
        assert "gave up after 2 attempts" in tally.parked["killed-always"].error
        # The service still serves.
        assert service.is_ready()
        await tally.publish(WORKED, message_id="after-crashes")
        await tally.settle(timeout=60)
        await fault_table.record(
            tally,
            "d. pool worker SIGKILLed on every attempt (+1 normal)",
            [service],
            parked=1,
            replies=1,
            rows=1,
        )
    assert metric(service, "deployflag_pool_rebuilds_total", cause="crash") == 2
    stored = await request_row(service_env["DEPLOYFLAG_DATABASE_URL"], "killed-always")
    assert stored is not None
    assert (stored["status"], stored["reason"]) == ("parked", "worker_crashed")


async def test_job_over_the_time_limit_is_killed_and_parked(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    service = start_service(
        service_env,
        DEPLOYFLAG_WORKERS="1",
        DEPLOYFLAG_JOB_TIME_LIMIT="1",
        DEPLOYFLAG_MAX_ATTEMPTS="2",
        **SLOW_TRAINING,
    )
    async with Tally(rabbit_url, names) as tally:
        await tally.publish(large_payload, message_id="too-slow")
        await tally.settle(timeout=120)
        parked = tally.parked["too-slow"]
        assert parked.reason == "time_limit", parked.error
        # The pool was killed and rebuilt for it, and the rebuilt pool serves.
        rebuilds = metric(service, "deployflag_pool_rebuilds_total", cause="time_limit")
        assert rebuilds is not None
        assert rebuilds >= 1
        await tally.publish(WORKED, message_id="after-time-limit")
        await tally.settle(timeout=60)
        await fault_table.record(
            tally,
            "e. job over the time limit (+1 normal)",
            [service],
            parked=1,
            replies=1,
            rows=1,
        )
    assert service.is_ready()


async def test_request_over_the_memory_limit_is_parked_and_a_normal_one_answered(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    service = start_service(
        service_env, DEPLOYFLAG_WORKERS="2", DEPLOYFLAG_WORKER_MEMORY_LIMIT=MEMORY_LIMIT
    )
    async with Tally(rabbit_url, names) as tally:
        await tally.publish(large_payload, message_id="too-big")
        await tally.publish(WORKED, message_id="alongside")
        await tally.publish(orjson.dumps({**orjson.loads(WORKED), "repo_id": 7}), message_id="n2")
        await tally.settle(timeout=120)
        parked = tally.parked["too-big"]
        assert parked.reason == "memory_limit", parked.error
        assert "DEPLOYFLAG_WORKER_MEMORY_LIMIT" in parked.error
        await fault_table.record(
            tally,
            "e. request over the memory limit (+2 normal)",
            [service],
            parked=1,
            replies=2,
            rows=2,
        )
    # Refused before anything crashed: no pool rebuild, and the service stays ready.
    assert metric(service, "deployflag_pool_rebuilds_total", cause="crash") == 0
    # The parked copy is published before the delivery's summary line is written: wait for it.
    await async_wait_until(
        lambda: [line["outcome"] for line in finished_lines([service])].count("parked") == 1,
        timeout=30,
        what="one parked summary line",
    )
    assert service.is_ready()
