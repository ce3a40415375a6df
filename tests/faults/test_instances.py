"""a., g. and h. Several instances on one broker and one PostgreSQL database.

a. one instance SIGKILLed (its whole process group) mid-training while another runs;
g. SIGTERM with requests in flight (finish or hand back), and a second SIGTERM (exit at once);
h. three instances share 300 requests.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally, busy_worker, descendants, in_flight, ok_counts
from tests.support.broker import Names, ServiceProcess
from tests.support.payloads import SLOW_TRAINING
from tests.support.toolkit import async_wait_until, wait_until

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(300),
    pytest.mark.rabbitmq,
    pytest.mark.postgres,
]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
TRAINING_CPU = 1.0  # CPU seconds after which a fresh worker is surely computing


def start_many(
    start_service: Callable[..., ServiceProcess], env: dict[str, str], count: int, **extra: str
) -> list[ServiceProcess]:
    """The first migrates the fresh database; the others start together once it has."""
    first = start_service(env, **extra)
    others = [start_service(env, ready=False, **extra) for _ in range(count - 1)]
    for service in others:
        service.wait_ready()
    return [first, *others]


async def test_instance_killed_mid_training_while_another_runs(
    start_service: Callable[..., ServiceProcess],
    pg_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    sample_payload: bytes,
    fault_table: FaultTable,
) -> None:
    victim, survivor = start_many(start_service, pg_env, 2, DEPLOYFLAG_WORKERS="1", **SLOW_TRAINING)
    async with Tally(rabbit_url, names) as tally:
        # One long request for each instance (prefetch 1), then short ones behind them.
        for i in range(2):
            await tally.publish(large_payload, message_id=f"large-{i}")
        for i in range(6):
            await tally.publish(sample_payload, message_id=f"sample-{i}")
        await async_wait_until(
            lambda: busy_worker(victim, TRAINING_CPU), timeout=60, what="the victim training"
        )
        orphans = descendants(victim)
        victim.kill()  # SIGKILL to the whole process group: service, forkserver, workers
        _, alive = psutil.wait_procs(orphans, timeout=30)
        assert not alive, f"processes left behind by the killed instance: {alive}"
        await tally.settle(timeout=180)
        await fault_table.record(
            tally,
            "a. instance SIGKILLed mid-training, 2nd on",
            [victim, survivor],
            replies=8,
            rows=8,
            parked=0,
        )
    assert survivor.is_ready()


async def test_sigterm_finishes_or_hands_back_and_a_second_sigterm_exits_at_once(
    start_service: Callable[..., ServiceProcess],
    pg_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    large_payload: bytes,
    fault_table: FaultTable,
) -> None:
    async with Tally(rabbit_url, names) as tally:
        # 1. Drain: two long requests in flight; SIGTERM; each finishes or goes back.
        first = start_service(
            pg_env, DEPLOYFLAG_WORKERS="2", DEPLOYFLAG_DRAIN_TIMEOUT="2", **SLOW_TRAINING
        )
        for i in range(2):
            await tally.publish(large_payload, message_id=f"long-{i}")
        for i in range(20):
            await tally.publish(WORKED, message_id=f"short-{i}")
        await async_wait_until(
            lambda: in_flight(first) == 2 and busy_worker(first, TRAINING_CPU),
            timeout=60,
            what="two requests in flight, one training",
        )
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0
        outcomes = Counter(
            line["outcome"] for line in first.log_lines() if line.get("event") == "request finished"
        )
        # Nothing of the first instance was left half-done.
        assert set(outcomes) <= {"ok", "requeued"}, outcomes

        # 2. A second SIGTERM while draining: out at once, the work goes back to the queue.
        await tally.publish(large_payload, message_id="long-2")  # something long to interrupt
        second = start_service(
            pg_env, DEPLOYFLAG_WORKERS="1", DEPLOYFLAG_DRAIN_TIMEOUT="600", **SLOW_TRAINING
        )
        await async_wait_until(
            lambda: busy_worker(second, TRAINING_CPU), timeout=60, what="the second training"
        )
        children = descendants(second)
        second.signal(signal.SIGTERM)
        await async_wait_until(
            lambda: any("draining" in str(line.get("event")) for line in second.log_lines()),
            timeout=10,
            what="the second instance to start draining",
        )
        second.signal(signal.SIGTERM)
        assert second.wait(timeout=10) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"processes left behind after the second SIGTERM: {alive}"

        # 3. A third instance takes over what was handed back or never taken.
        third = start_service(pg_env, DEPLOYFLAG_WORKERS="2", **SLOW_TRAINING)
        await tally.settle(timeout=180)
        await fault_table.record(
            tally,
            "g. SIGTERM in flight; 2nd SIGTERM exits at once; 3rd instance drains",
            [first, second, third],
            replies=23,
            rows=23,
            parked=0,
        )


async def test_three_instances_share_the_work_and_train_each_request_once(
    start_service: Callable[..., ServiceProcess],
    pg_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    sample_payload: bytes,
    fault_table: FaultTable,
) -> None:
    services = start_many(start_service, pg_env, 3, DEPLOYFLAG_WORKERS="1")
    async with Tally(rabbit_url, names) as tally:
        wait_until(lambda: all(s.is_ready() for s in services), 30, "all three consuming")
        for i in range(300):
            await tally.publish(sample_payload, message_id=f"req-{i:03d}")
        await tally.settle(timeout=300)
        await fault_table.record(
            tally,
            "h. three instances, 300 requests",
            services,
            replies=300,
            rows=300,
            parked=0,
        )
    per_instance = [sum(ok_counts([s]).values()) for s in services]
    assert all(n > 0 for n in per_instance), per_instance
    assert sum(per_instance) == 300
