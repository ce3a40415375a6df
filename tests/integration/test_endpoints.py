"""/readyz and /metrics of a running `serve`: what an operator's probes and scrapes see."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest

from tests.support.broker import ServiceProcess, Upstream
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import async_wait_until, read_metrics, wait_until

pytestmark = pytest.mark.rabbitmq


def scrape(service: ServiceProcess) -> dict[str, float]:
    """Every sample of /metrics as {'name{labels}': value}."""
    samples = read_metrics(service.http_port)
    assert samples is not None, "/metrics did not answer"
    flat = {}
    for name, series in samples.items():
        for labels, value in series.items():
            inner = ",".join(f'{k}="{v}"' for k, v in labels)
            flat[f"{name}{{{inner}}}" if labels else name] = value
    return flat


async def test_ready_only_once_the_consumer_is_registered(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service = start_service(service_env, ready=False)
    seen: list[bool] = []

    async def ready_and_consuming() -> bool:
        answer = service.readyz()
        if answer is None:
            return False
        status, body = answer
        if status != 200:
            assert body["ready"] is False
            return False
        # The moment readiness says yes, the broker must already list the consumer.
        seen.append(await upstream.consumers("training") == 1)
        return True

    await async_wait_until(ready_and_consuming, timeout=60, what="the service to be ready")
    assert seen == [True]


async def test_metrics_move_when_requests_flow(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    worked_example: bytes,
) -> None:
    service = start_service(service_env)
    before = scrape(service)
    assert before['deployflag_requests_total{outcome="ok",reason=""}'] == 0
    await upstream.publish(worked_example, message_id="m-1")
    await upstream.publish(worked_example, message_id="m-2")
    await upstream.publish(worked_example, message_id="m-1")  # a duplicate
    await upstream.publish(b"not json", message_id="m-bad")
    await upstream.drain("save_result", 3, timeout=60)
    await upstream.drain("failed", 1, timeout=60)
    after = await async_wait_until(
        lambda: (s := scrape(service))['deployflag_stage_seconds_count{stage="total"}'] == 4 and s,
        timeout=10,
        what="four deliveries counted",
    )
    assert after['deployflag_requests_total{outcome="ok",reason=""}'] == 2
    assert after['deployflag_requests_total{outcome="duplicate",reason=""}'] == 1
    assert after['deployflag_requests_total{outcome="parked",reason="not_json"}'] == 1
    assert after['deployflag_stage_seconds_count{stage="pipeline"}'] == 2
    assert after["deployflag_in_flight"] == 0
    assert after["deployflag_consumer_ready"] == 1
    assert after["deployflag_event_loop_lag_seconds_count"] > 0


@pytest.mark.postgres
async def test_not_ready_while_the_database_is_down(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    postgres: PostgresCluster,
    upstream: Upstream,
    worked_example: bytes,
) -> None:
    url = postgres.fresh_database(f"ready_{uuid.uuid4().hex[:8]}")
    service = start_service(
        service_env,
        DEPLOYFLAG_DATABASE_URL=url,
        DEPLOYFLAG_AUTO_MIGRATE="true",
        DEPLOYFLAG_DATABASE_CHECK_INTERVAL="0.5",
    )
    postgres.stop()
    try:
        _, body = await asyncio.to_thread(
            wait_until,
            lambda: (a := service.readyz()) is not None and a[0] == 503 and a,
            30,
            "readiness to report the database",
        )
        assert body["checks"]["database"] is False
        assert body["checks"]["consumer"] is True
    finally:
        postgres.start()
    await async_wait_until(service.is_ready, timeout=60, what="ready again")
    await upstream.publish(worked_example, message_id="after-db")
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == "after-db"
