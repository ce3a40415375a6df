"""`deployflag serve` against the real RabbitMQ: replies, de-duplication, parking, signals.

Each test starts the service as a subprocess on its own queues and talks to it as the upstream.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from deployflag.handler import INLINE_DECODE_BYTES
from deployflag.settings import load_settings
from deployflag.store import Store
from deployflag.submit import celery_message
from tests.support.broker import Names, ServiceProcess, Upstream
from tests.support.payloads import SLOW_TRAINING
from tests.support.toolkit import async_wait_until, metric, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"


def metadata_rows(env: dict[str, str]) -> list[tuple[Any, ...]]:
    path = env["DEPLOYFLAG_DATABASE_URL"].split("///", 1)[1]
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT request_id, repo_id, number_of_training_data_rows, scoring "
            "FROM model_performance_metadata"
        ).fetchall()


def outcomes(service: ServiceProcess) -> list[str]:
    return [
        line["outcome"] for line in service.log_lines() if line.get("event") == "request finished"
    ]


@pytest.mark.parametrize("inline_bytes", ["16KiB", "0"], ids=["in the service", "in a worker"])
async def test_json_request_gets_json_reply_with_spec_weights_and_one_metadata_row(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    inline_bytes: str,
) -> None:
    # Given a running service that computes a lone small request itself, or hands it to a worker
    service = start_service({**service_env, "DEPLOYFLAG_INLINE_JOB_MAX_BYTES": inline_bytes})
    # When the upstream publishes the worked example (docs/scoring.md) as plain JSON
    request_id = str(uuid.uuid4())
    await upstream.publish(WORKED, message_id=request_id)
    # Then one JSON reply arrives on the result queue with the forecast scoring's weights
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.content_type == "application/json"
    assert reply.correlation_id == request_id
    result = orjson.loads(reply.body)
    assert result["request_id"] == request_id
    assert result["repo_id"] == 42
    assert result["status"] == "ok"
    [score] = result["scores"]
    assert score["issue_shortcode"] == "PYL-W0611"
    assert (score["issue_weight"], score["fix_rate"], score["events"]) == (95, 0.2543, 5)
    assert score["daily_weighted_fix_rate"] == 0.5714
    assert score["historical_weighted_fix_rate"] == 0.4
    assert result["scoring"] == "forecast"
    assert result["model"]["estimator"] == "LogisticRegression"
    # And exactly one metadata row was recorded for it, naming the scoring
    assert [(row[0], row[3]) for row in metadata_rows(service_env)] == [(request_id, "forecast")]
    # And the job ran where the setting says
    computed_here = 1.0 if inline_bytes != "0" else 0.0
    assert metric(service.http_port, "deployflag_inline_jobs_total") == computed_here


async def test_seed_scoring_answers_with_the_originals_weights(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    # Given a service set to the seed scoring
    service = start_service({**service_env, "DEPLOYFLAG_SCORING": "seed"})
    # When the worked example arrives
    await upstream.publish(WORKED, message_id="seed-1")
    # Then its weight is the original computation's 41, and the metadata row says seed
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    result = orjson.loads(reply.body)
    assert (result["scoring"], result["scores"][0]["issue_weight"]) == ("seed", 41)
    assert result["model"]["skipped_reason"] == "one_class"
    assert [(row[0], row[3]) for row in metadata_rows(service_env)] == [("seed-1", "seed")]
    # And it ran in a worker: seed scoring's grid search is never run on the event loop
    assert metric(service.http_port, "deployflag_inline_jobs_total") == 0


async def test_reply_to_and_correlation_id_are_honoured(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    start_service(service_env)
    private = await upstream.channel.declare_queue(exclusive=True)
    await upstream.publish(WORKED, message_id="req-reply-to", reply_to=private.name)
    message = await async_wait_until(
        lambda: private.get(fail=False), timeout=60, what="a reply on the reply_to queue"
    )
    await message.ack()
    assert message.correlation_id == "req-reply-to"
    assert orjson.loads(message.body)["scores"][0]["issue_weight"] == 95
    assert await upstream.count("save_result") == 0


async def test_fifty_concurrent_requests_all_answered_and_a_repeated_id_trains_once(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    sample_payload: bytes,
) -> None:
    service = start_service(service_env)
    # 50 distinct requests at once
    ids = [f"req-{i}" for i in range(50)]
    await asyncio.gather(*(upstream.publish(sample_payload, message_id=i) for i in ids))
    replies = await upstream.drain("save_result", 50, timeout=240)
    assert sorted(r.correlation_id for r in replies) == sorted(ids)
    # The same request id delivered five times: trained once, answered five times
    for _ in range(5):
        await upstream.publish(sample_payload, message_id="same-id")
    again = await upstream.drain("save_result", 5, timeout=120)
    assert {r.correlation_id for r in again} == {"same-id"}
    assert len({r.body for r in again}) == 1, "every copy carries the one stored result"
    rows = [row[0] for row in metadata_rows(service_env)]
    assert rows.count("same-id") == 1
    assert len(rows) == 51
    await async_wait_until(
        lambda: outcomes(service).count("duplicate") == 4, timeout=10, what="4 duplicates logged"
    )
    assert outcomes(service).count("ok") == 51


BAD_INPUTS: list[tuple[str, bytes, dict[str, Any], str | None, str]] = [
    # (name, body, headers, content_type, expected reason)
    ("empty", b"", {}, "application/json", "empty_body"),
    ("not json", b"{nope", {}, "application/json", "not_json"),
    ("not utf-8", b'{"repo_id": "\xff"}', {}, "application/json", "not_utf8"),
    ("array", b"[1, 2]", {}, "application/json", "unknown_envelope"),
    ("number", b"42", {}, "application/json", "wrong_type"),
    ("missing list", b'{"repo_id": 1, "analysis_run": []}', {}, None, "missing_field"),
    (
        "negative frequency",
        b'{"repo_id": 1, "analysis_run": [], "historical_run": [{"timestamp": '
        b'"2021-01-01T00:00:00", "shortcode": "X", "frequency": -1}]}',
        {},
        None,
        "out_of_range",
    ),
    ("pickle", b"\x80\x04K\x01.", {}, "application/x-python-serialize", "unsupported_content_type"),
    ("unknown task", b"[[{}], {}, {}]", {"task": "evil.task", "id": "t1"}, None, "unknown_task"),
    (
        "bad celery body",
        b'{"a": 1}',
        {"task": "deployflag.contrib.ocave.tasks.process_data_from_ocave", "id": "t2"},
        None,
        "bad_celery_body",
    ),
]


async def test_bad_input_is_parked_with_its_reason_and_the_service_keeps_serving(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service = start_service(service_env)
    for index, (_, body, headers, ctype, _) in enumerate(BAD_INPUTS):
        await upstream.publish(body, message_id=f"bad-{index}", headers=headers, content_type=ctype)
    parked = await upstream.drain("failed", len(BAD_INPUTS), timeout=60)
    reasons = {m.message_id: m.headers["x-deployflag-reason"] for m in parked}
    expected = {f"bad-{i}": case[4] for i, case in enumerate(BAD_INPUTS)}
    assert reasons == expected
    for message in parked:
        assert message.headers["x-deployflag-error"], "every parked message says why"
    # The original headers travel with the parked copy
    celery_parked = next(m for m in parked if m.message_id == "bad-8")
    assert celery_parked.headers["task"] == "evil.task"
    # And the service still answers a valid request
    assert service.is_ready()
    await upstream.publish(WORKED, message_id="after-bad")
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == "after-bad"
    assert await upstream.count("training") == 0


async def test_a_small_request_published_again_after_it_finished_gets_the_stored_result(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    # A small first delivery starts computing while it is claimed; the claim must still find the
    # finished request and answer with what was stored, recording nothing new.
    service = start_service(service_env)
    await upstream.publish(WORKED, message_id="again")
    [first] = await upstream.drain("save_result", 1, timeout=60)
    await upstream.publish(WORKED, message_id="again")
    [second] = await upstream.drain("save_result", 1, timeout=60)
    assert second.body == first.body, "the stored result, finished_at included"
    assert [row[0] for row in metadata_rows(service_env)] == ["again"]
    await async_wait_until(
        lambda: outcomes(service) == ["ok", "duplicate"], timeout=10, what="ok, then duplicate"
    )


async def test_a_small_request_out_of_attempts_is_parked_without_a_result(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    # Its earlier copies crashed workers three times (DEPLOYFLAG_MAX_ATTEMPTS): even though a
    # small first delivery computes while it is claimed, the claim decides, and it is parked.
    start_service(service_env)
    store = await Store.open(load_settings(database_url=service_env["DEPLOYFLAG_DATABASE_URL"]))
    try:
        for _ in range(3):
            await store.claim("spent", 42)
    finally:
        await store.close()
    await upstream.publish(WORKED, message_id="spent")
    [parked] = await upstream.drain("failed", 1, timeout=60)
    assert parked.headers["x-deployflag-reason"] == "max_attempts"
    assert await upstream.count("save_result") == 0
    assert metadata_rows(service_env) == []


async def test_a_large_celery_request_is_identified_from_its_headers(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    sample_payload: bytes,
) -> None:
    # Protocol-2 bodies above the inline-decode size are not parsed just for their id: the
    # request must still be answered and recorded with the repo id only its body carries, and
    # a broken large body must still be parked with its reason.
    assert len(sample_payload) > INLINE_DECODE_BYTES
    service = start_service(service_env)
    message = celery_message(sample_payload, TRAINING_TASK, "large-celery")
    await upstream.exchange.publish(message, routing_key=upstream.names.queue("training"))
    broken = b'{"padding": "' + b"x" * INLINE_DECODE_BYTES + b'"}'
    await upstream.publish(broken, headers={"task": TRAINING_TASK, "id": "large-broken"})
    [reply] = await upstream.drain("save_result", 1, timeout=120)
    assert reply.correlation_id == "large-celery"
    repo_id = orjson.loads(sample_payload)["repo_id"]
    assert (
        orjson.loads(reply.body)[1]["repo_id"] == repo_id
    )  # a Celery reply: [args, kwargs, embed]
    assert [row[:2] for row in metadata_rows(service_env)] == [("large-celery", str(repo_id))]
    [parked] = await upstream.drain("failed", 1, timeout=60)
    assert parked.headers["x-deployflag-reason"] == "bad_celery_body"
    assert parked.headers["x-deployflag-request-id"] == "large-broken"
    finished = [line for line in service.log_lines() if line.get("event") == "request finished"]
    assert {line.get("repo_id") for line in finished if line["outcome"] == "ok"} == {repo_id}


async def test_sigterm_during_training_finishes_the_request_and_exits_zero(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    large_payload: bytes,
) -> None:
    service = start_service(service_env, **SLOW_TRAINING)
    await upstream.publish(large_payload, message_id="long-one")
    await async_wait_until(
        lambda: in_flight(service) == 1,
        timeout=60,
        what="the request to be in flight",
    )
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=120) == 0
    # Finished during the drain: the reply is there and nothing is left in the queue
    [reply] = await upstream.drain("save_result", 1, timeout=10)
    assert reply.correlation_id == "long-one"
    assert await upstream.count("training") == 0


async def test_sigterm_past_the_drain_timeout_hands_the_request_back(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    large_payload: bytes,
) -> None:
    service = start_service(service_env, DEPLOYFLAG_DRAIN_TIMEOUT="0.2", **SLOW_TRAINING)
    await upstream.publish(large_payload, message_id="handed-back")
    await async_wait_until(lambda: in_flight(service) == 1, timeout=60, what="a request in flight")
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=60) == 0
    # Not lost: back in the queue for another instance
    assert await async_wait_until(
        lambda: upstream.count("training"), timeout=30, what="the request back in the queue"
    )
    assert await upstream.count("save_result") == 0


async def test_broker_restart_reconnects_and_re_registers_the_consumer(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
) -> None:
    service = start_service(service_env)
    rabbitmqctl("stop_app")
    try:
        await async_wait_until(lambda: not service.is_ready(), timeout=30, what="readiness to drop")
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    await async_wait_until(service.is_ready, timeout=90, what="the service to be ready again")
    async with Upstream(rabbit_url, names) as up:
        assert (
            await async_wait_until(
                lambda: up.consumers("training"), timeout=30, what="the consumer to be registered"
            )
            == 1
        )
        await up.publish(WORKED, message_id="after-restart")
        [reply] = await up.drain("save_result", 1, timeout=60)
        assert reply.correlation_id == "after-restart"


def in_flight(service: ServiceProcess) -> int:
    """The service's in-flight gauge, read from /metrics (-1 when unreachable)."""
    value = metric(service.http_port, "deployflag_in_flight")
    return -1 if value is None else int(value)


async def test_quorum_queues_are_one_setting_away(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
) -> None:
    start_service(service_env, DEPLOYFLAG_QUEUE_TYPE="quorum")
    vhost = rabbit_url.rsplit("/", 1)[1]
    listing = rabbitmqctl("list_queues", "-p", vhost, "name", "type", "--no-table-headers")
    types = dict(line.split() for line in listing.splitlines() if names.suffix in line)
    assert set(types.values()) == {"quorum"}
    assert len(types) == 4
    # A quorum-queue upstream declares the same arguments; the service answers as before.
    connection = await aio_pika.connect(rabbit_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(
            aio_pika.Message(WORKED, message_id="quorum-1"), routing_key=names.queue("training")
        )
        results = await channel.declare_queue(
            names.queue("save_result"), durable=True, arguments={"x-queue-type": "quorum"}
        )
        reply = await async_wait_until(
            lambda: results.get(fail=False), timeout=60, what="a reply on the quorum queue"
        )
        await reply.ack()
        assert reply.correlation_id == "quorum-1"
