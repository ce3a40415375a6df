"""Health state, readiness, liveness and the loop-lag monitor."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from deployflag.health import Health, monitor_loop
from deployflag.metrics import Metrics
from deployflag.settings import load_settings
from tests.support.toolkit import async_wait_until


def test_ready_only_when_every_part_is() -> None:
    health = Health()
    ready, body = health.readiness()
    assert not ready
    assert body == {
        "ready": False,
        "checks": {"consumer": False, "database": False, "pool": False, "draining": False},
    }

    health.consumer_ready = health.database_ok = health.pool_alive = True
    assert health.readiness()[0]

    health.draining = True
    ready, body = health.readiness()
    assert not ready
    assert body["checks"]["draining"] is True


def test_liveness_follows_the_last_tick_and_its_lag() -> None:
    health = Health(stall_seconds=10.0)
    health.record_tick(100.0, 0.001)
    assert health.alive(now=105.0)
    assert health.alive(now=110.0)
    assert not health.alive(now=110.5)  # no tick for longer than the bound: stalled now

    health.record_tick(111.0, 10.5)  # the monitor just woke 10.5 s late
    assert not health.alive(now=111.0)

    health.record_tick(111.1, 0.0)  # and then on time again
    assert health.alive(now=111.1)


def test_stall_bound_comes_from_the_settings() -> None:
    health = Health.from_settings(load_settings(loop_stall_seconds=2.5))
    assert health.stall_seconds == 2.5


def test_lag_statistics() -> None:
    health = Health()
    assert health.lag_max() == 0.0
    assert health.lag_p99() == 0.0
    for i in range(1, 201):
        health.record_tick(float(i), i / 1000)
    assert health.lag_max() == pytest.approx(0.2)
    assert health.lag_p99() == pytest.approx(0.198)


async def test_monitor_records_a_stalled_loop() -> None:
    # Given a running monitor
    health = Health()
    metrics = Metrics(process_metrics=False)
    task = asyncio.create_task(monitor_loop(health, metrics, interval=0.05))

    def samples() -> float:
        return metrics.registry.get_sample_value("deployflag_event_loop_lag_seconds_count") or 0

    def over_100ms() -> float:
        below = metrics.registry.get_sample_value(
            "deployflag_event_loop_lag_seconds_bucket", {"le": "0.1"}
        )
        return samples() - (below or 0)

    try:
        await async_wait_until(lambda: samples() >= 2, 5, "two lag samples")
        assert over_100ms() == 0

        # When the loop is blocked for 0.3 s (the stall under test, not a wait)
        time.sleep(0.3)  # noqa: ASYNC251

        # Then the monitor's next wake-up records it, in the histogram and in the gauge
        await async_wait_until(lambda: over_100ms() >= 1, 5, "the stall recorded")
        assert health.lag_max() >= 0.2
        gauge = metrics.registry.get_sample_value("deployflag_event_loop_lag_max_seconds")
        assert gauge is not None
        assert gauge >= 0.2
        assert health.alive()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_monitor_rejects_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        await monitor_loop(Health(), None, interval=0)
