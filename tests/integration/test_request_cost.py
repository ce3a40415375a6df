"""Bounded cost per request in the main process, against `serve` on the real RabbitMQ: a cap on
distinct shortcodes, and a reply too large parked before the request is recorded as done."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import orjson
import pytest

from tests.support.broker import ServiceProcess, Upstream

pytestmark = pytest.mark.rabbitmq


def many_shortcodes(count: int) -> bytes:
    rows = [
        {"timestamp": "2021-01-01T00:00:00", "shortcode": f"SC-{i}", "frequency": 1}
        for i in range(count)
    ]
    return orjson.dumps({"repo_id": 7, "analysis_run": [], "historical_run": rows})


def request_row(env: dict[str, str], request_id: str) -> tuple[str, int]:
    path = env["DEPLOYFLAG_DATABASE_URL"].split("///", 1)[1]
    with sqlite3.connect(path) as db:
        status, metadata = db.execute(
            "SELECT status, (SELECT count(*) FROM model_performance_metadata) "
            "FROM training_request WHERE request_id = ?",
            (request_id,),
        ).fetchone()
    return str(status), int(metadata)


async def test_more_distinct_shortcodes_than_the_cap_is_parked(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    start_service(service_env, DEPLOYFLAG_MAX_SHORTCODES="50")
    await upstream.publish(many_shortcodes(51), message_id="over-the-cap")
    await upstream.publish(many_shortcodes(50), message_id="at-the-cap")
    [reply] = await upstream.drain("save_result", 1, timeout=90)
    assert reply.correlation_id == "at-the-cap"
    [parked] = await upstream.drain("failed", 1, timeout=30)
    assert parked.headers["x-deployflag-reason"] == "too_many_shortcodes"
    assert "51 distinct shortcodes" in str(parked.headers["x-deployflag-error"])


async def test_a_reply_too_large_is_parked_before_anything_is_recorded_as_done(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    body = many_shortcodes(100)
    limit = len(body) + 100  # the request fits; its reply (a score per shortcode) does not
    start_service(service_env, DEPLOYFLAG_MAX_MESSAGE_BYTES=str(limit))
    await upstream.publish(body, message_id="reply-too-large")
    [parked] = await upstream.drain("failed", 1, timeout=90)
    assert parked.headers["x-deployflag-reason"] == "reply_too_large"
    assert request_row(service_env, "reply-too-large") == ("parked", 0)
    assert await upstream.count("save_result") == 0
