"""`deployflag failed list | replay | purge` against the real RabbitMQ and a real `serve`.

Requests are parked for real (a body over a too-small DEPLOYFLAG_MAX_MESSAGE_BYTES, or not JSON),
then read, replayed to a service restarted with a larger limit, or purged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from deployflag import exitcodes
from deployflag.submit import celery_message
from tests.integration.test_cli import deployflag, one_line_error
from tests.support.broker import ServiceProcess, Upstream
from tests.support.toolkit import async_wait_until, rabbitmqctl

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
TRAINING_TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
SMALL_LIMIT = str(len(WORKED) - 1)  # the worked example is parked as too_large


def cli_env(service_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in service_env.items() if k.startswith("DEPLOYFLAG_")}


async def depth(upstream: Upstream, kind: str) -> int:
    """Ready plus unacknowledged messages on one of the test's queues (from the broker)."""
    vhost = upstream.url.rsplit("/", 1)[1]
    listing = await asyncio.to_thread(
        rabbitmqctl, "list_queues", "-p", vhost, "name", "messages", "--no-table-headers"
    )
    wanted = upstream.names.queue(kind)
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == wanted:
            return int(parts[1])
    raise AssertionError(f"queue {wanted} not listed: {listing!r}")


async def snapshot(upstream: Upstream, kind: str) -> Counter[tuple[Any, ...]]:
    """Every message on a queue as (message id, correlation id, body, headers), taking them
    unacked and handing them back by closing the channel."""
    channel = await upstream.connection.channel()
    try:
        queue = await channel.declare_queue(upstream.names.queue(kind), passive=True)
        seen: Counter[tuple[Any, ...]] = Counter()
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            headers = tuple(sorted((k, repr(v)) for k, v in (message.headers or {}).items()))
            seen[(message.message_id, message.correlation_id, message.body, headers)] += 1
    finally:
        await channel.close()
    return seen


async def park_requests(
    upstream: Upstream,
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    *,
    json_ids: list[str],
    celery_ids: list[str] = (),  # type: ignore[assignment]
    not_json_ids: list[str] = (),  # type: ignore[assignment]
) -> None:
    """Given requests parked by a service whose size limit is below the worked example's."""
    service = start_service(service_env, DEPLOYFLAG_MAX_MESSAGE_BYTES=SMALL_LIMIT)
    for rid in json_ids:
        await upstream.publish(WORKED, message_id=rid)
    for rid in celery_ids:
        await upstream.exchange.publish(
            celery_message(WORKED, TRAINING_TASK, rid), routing_key=upstream.names.queue("training")
        )
    for rid in not_json_ids:
        await upstream.publish(b"{nope", message_id=rid)
    total = len(json_ids) + len(celery_ids) + len(not_json_ids)
    await async_wait_until(
        lambda: _count_is(upstream, "failed", total),
        60,
        f"{total} parked messages",
        every=0.2,
    )
    assert service.stop() == 0


async def _count_is(upstream: Upstream, kind: str, n: int) -> bool:
    return await upstream.count(kind) == n


def reports(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """What `requests show` says of every request of the worked example's repository."""
    done = deployflag("requests", "show", "--repo", "42", "--last", "1000", "--json", env=env)
    assert done.returncode == 0, done.stderr
    return {r["request_id"]: r for r in orjson.loads(done.stdout)}


def trained(service: ServiceProcess) -> Counter[str]:
    """Requests this service trained (outcome ok), by request id, from its log."""
    return Counter(
        line.get("request_id")
        for line in service.log_lines()
        if line.get("event") == "request finished" and line.get("outcome") == "ok"
    )


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def backend_env(request: pytest.FixtureRequest, service_env: dict[str, str]) -> dict[str, str]:
    """The service environment on SQLite (its default) or on a fresh PostgreSQL database."""
    if request.param == "postgres":
        cluster = request.getfixturevalue("postgres")
        url = cluster.fresh_database(f"t_{uuid.uuid4().hex[:16]}")
        service_env = {**service_env, "DEPLOYFLAG_DATABASE_URL": url}
        service_env["DEPLOYFLAG_AUTO_MIGRATE"] = "true"
    return service_env


# --- list -----------------------------------------------------------------------------------


async def test_list_counts_and_describes_and_leaves_every_message_on_the_queue(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    # Given three too-large JSON requests, one too-large Celery one and two bodies that are not JSON
    await park_requests(
        upstream,
        start_service,
        service_env,
        json_ids=["big-1", "big-2", "big-3"],
        celery_ids=["task-1"],
        not_json_ids=["bad-1", "bad-2"],
    )
    before = await snapshot(upstream, "failed")
    assert sum(before.values()) == 6
    # When an operator lists them
    done = deployflag("failed", "list", "--json", env=cli_env(service_env))
    assert done.returncode == 0, done.stderr
    listing = orjson.loads(done.stdout)
    # Then the counts and the lines say what the headers say
    assert listing["total"] == 6
    assert listing["by_reason"] == {"too_large": 4, "not_json": 2}
    lines = {m["request_id"]: m for m in listing["messages"]}
    assert set(lines) == {"big-1", "big-2", "big-3", "task-1", "bad-1", "bad-2"}
    assert lines["big-1"]["repo_id"] == "42"
    assert lines["big-1"]["size"] == len(WORKED)
    assert lines["big-1"]["kind"] == "json"
    assert lines["task-1"]["kind"] == "celery"
    assert lines["task-1"]["repo_id"] == "42"
    assert lines["bad-1"]["kind"] == "not-json"
    assert "DEPLOYFLAG_MAX_MESSAGE_BYTES" in lines["big-2"]["error"]
    assert datetime.fromisoformat(lines["big-3"]["parked_at"]) <= datetime.now(UTC)
    # And the filters and the people's form work
    limited = deployflag("failed", "list", "--reason", "not_json", "--limit", "1", "--json",
                         env=cli_env(service_env))  # fmt: skip
    assert orjson.loads(limited.stdout)["total"] == 2
    assert len(orjson.loads(limited.stdout)["messages"]) == 1
    text = deployflag("failed", "list", env=cli_env(service_env))
    assert text.returncode == 0
    assert text.stdout.decode().splitlines()[0].startswith("6 parked on ")
    # And the queue holds the same messages as before, no more, no fewer
    assert await snapshot(upstream, "failed") == before


async def test_list_of_a_missing_queue_is_one_line_and_exit_69(
    service_env: dict[str, str],
) -> None:
    env = {**cli_env(service_env), "DEPLOYFLAG_FAILED_QUEUE": "no-such-queue"}
    done = deployflag("failed", "list", env=env)
    assert done.returncode == exitcodes.RET_BROKER
    assert "no-such-queue does not exist" in one_line_error(done)


# --- replay ---------------------------------------------------------------------------------


async def test_replay_after_raising_the_limit_answers_each_request_exactly_once(
    start_service: Callable[..., ServiceProcess],
    backend_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service_env = backend_env
    json_ids = [f"json-{i}" for i in range(8)]
    celery_ids = [f"task-{i}" for i in range(4)]
    await park_requests(
        upstream, start_service, service_env, json_ids=json_ids, celery_ids=celery_ids,
        not_json_ids=["bad-1"],
    )  # fmt: skip
    everyone = set(json_ids + celery_ids)
    # Given the service restarted with the default (large) limit
    service = start_service(service_env)
    # When the too-large ones are replayed (a dry run first changes nothing)
    dry = deployflag("failed", "replay", "--reason", "too_large", "--dry-run",
                     env=cli_env(service_env))  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert b"would replay 12 of 13" in dry.stdout
    assert await depth(upstream, "failed") == 13
    done = deployflag("failed", "replay", "--reason", "too_large", env=cli_env(service_env))
    assert done.returncode == 0, done.stderr
    assert b"replayed 12 to " in done.stdout
    # Then each is answered once, in the envelope it came in
    replies = await upstream.drain("save_result", len(everyone), timeout=120)
    assert Counter(r.correlation_id for r in replies) == Counter(everyone)
    kinds = {r.correlation_id: r.headers.get("task") is not None for r in replies}
    assert {rid for rid, is_celery in kinds.items() if is_celery} == set(celery_ids)
    await async_wait_until(
        lambda: _count_is(upstream, "training", 0), 60, "the training queue to drain"
    )
    await async_wait_until(lambda: trained(service).total() == 12, 60, "12 trainings logged")
    assert await depth(upstream, "save_result") == 0  # no second reply
    assert trained(service) == Counter(everyone)
    # And the one that is still broken stays parked
    assert await depth(upstream, "failed") == 1
    # And each request trained from attempt 1, its park kept in the history
    found = reports(cli_env(service_env))
    assert {rid: (found[rid]["status"], found[rid]["attempts"]) for rid in everyone} == {
        rid: ("done", 1) for rid in everyone
    }
    for rid in everyone:
        [park] = found[rid]["parks"]
        assert (park["reason"], park["replay_count"]) == ("too_large", 1)
        assert park["replayed_at"] is not None


async def test_replay_needs_a_selection(service_env: dict[str, str]) -> None:
    done = deployflag("failed", "replay", env=cli_env(service_env))
    assert done.returncode == exitcodes.RET_USAGE
    assert "--all" in one_line_error(done)


async def test_a_replay_killed_midway_and_run_again_loses_nothing_and_trains_nothing_twice(
    start_service: Callable[..., ServiceProcess],
    backend_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service_env = backend_env
    ids = [f"req-{i:03d}" for i in range(60)]
    await park_requests(upstream, start_service, service_env, json_ids=ids)
    service = start_service(service_env)
    # When a replay is killed (SIGKILL) as soon as it has replayed its first request
    replay = start_replay(cli_env(service_env))
    assert replay.stdout is not None
    first = await asyncio.to_thread(replay.stdout.readline)
    replay.send_signal(signal.SIGKILL)
    rest = replay.communicate(timeout=30)[0]
    assert first.endswith(b": replayed\n"), first + rest
    printed = 1 + rest.count(b": replayed\n")
    assert printed < len(ids), "the replay finished before it was killed: not an interruption"
    # Then what it had not acked is back on the failed queue
    await async_wait_until(
        lambda: _nonzero(upstream),
        30,
        "the killed replay's held messages to return",
    )
    # When it is run again to the end
    again = deployflag("failed", "replay", "--all", env=cli_env(service_env))
    assert again.returncode == 0, again.stderr
    # Then every request is answered (a duplicate reply at worst) and none trained twice
    replies: list[aio_pika.IncomingMessage] = []
    replies += await upstream.drain("save_result", len(ids), timeout=180)
    await async_wait_until(
        lambda: _count_is(upstream, "training", 0), 60, "the training queue to drain"
    )
    await async_wait_until(lambda: set(trained(service)) == set(ids), 120, "every request trained")
    extra = await depth(upstream, "save_result")
    if extra:
        replies += await upstream.drain("save_result", extra, timeout=30)
    assert set(r.correlation_id for r in replies) == set(ids)  # nothing lost
    assert trained(service) == Counter(ids)  # nothing trained twice
    assert await depth(upstream, "failed") == 0
    found = reports(cli_env(service_env))
    assert {found[rid]["status"] for rid in ids} == {"done"}
    print(f"killed after {printed} printed; {len(replies) - len(ids)} duplicate replies")


def start_replay(env: dict[str, str]) -> subprocess.Popen[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYFLAG_")}
    return subprocess.Popen(
        [sys.executable, "-m", "deployflag", "failed", "replay", "--all"],
        env={**base, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _nonzero(upstream: Upstream) -> bool:
    return await upstream.count("failed") > 0


# --- purge ----------------------------------------------------------------------------------


async def publish_parked(upstream: Upstream, rid: str, reason: str, age: timedelta) -> None:
    message = aio_pika.Message(
        body=WORKED,
        message_id=rid,
        content_type="application/json",
        headers={
            "x-deployflag-reason": reason,
            "x-deployflag-error": "test",
            "x-deployflag-request-id": rid,
            "x-deployflag-parked-at": (datetime.now(UTC) - age).isoformat(),
        },
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await upstream.exchange.publish(message, routing_key=upstream.names.queue("failed"))


async def test_purge_asks_first_and_deletes_only_what_matches(
    service_env: dict[str, str], upstream: Upstream
) -> None:
    await publish_parked(upstream, "old-1", "not_json", timedelta(days=10))
    await publish_parked(upstream, "old-2", "not_json", timedelta(days=8))
    await publish_parked(upstream, "new-1", "not_json", timedelta(hours=1))
    await publish_parked(upstream, "old-big", "too_large", timedelta(days=10))
    env = cli_env(service_env)
    args = ("failed", "purge", "--reason", "not_json", "--older-than", "7d")
    # When the operator answers no, nothing is deleted
    no = deployflag(*args, env=env, stdin=b"n\n")
    assert no.returncode == exitcodes.RET_ERROR
    assert b"delete 2 parked messages" in no.stdout
    assert await depth(upstream, "failed") == 4
    # When yes, the two old not_json ones go, the others stay
    yes = deployflag(*args, env=env, stdin=b"y\n")
    assert yes.returncode == 0, yes.stderr
    left = orjson.loads(deployflag("failed", "list", "--json", env=env).stdout)
    assert sorted(m["request_id"] for m in left["messages"]) == ["new-1", "old-big"]
    # And --yes does not ask
    quiet = deployflag("failed", "purge", "--reason", "too_large", "--yes", env=env)
    assert quiet.returncode == 0
    assert b"?" not in quiet.stdout
    assert await depth(upstream, "failed") == 1
    bad = deployflag("failed", "purge", "--older-than", "soon", env=env)
    assert bad.returncode == exitcodes.RET_USAGE


async def test_a_replay_interrupted_between_the_confirm_and_the_ack_is_not_published_again(
    service_env: dict[str, str], upstream: Upstream
) -> None:
    from deployflag.parked import FailedQueue
    from deployflag.settings import load_settings
    from deployflag.store import Store
    from deployflag.store.audit import mark_replayed, note_park

    await publish_parked(upstream, "once", "too_large", timedelta(minutes=5))
    settings = load_settings(**{k.removeprefix("DEPLOYFLAG_").lower(): v
                                for k, v in cli_env(service_env).items()})  # fmt: skip
    store = await Store.open(settings)
    try:
        # Given a replay that got its copy confirmed and noted, then died before its ack
        async with FailedQueue(settings).open() as queue:
            [parked] = await queue.fetch_all()
            assert parked.request_id == "once"
            assert parked.parked_at is not None
            await note_park(
                store.engine,
                request_id="once",
                repo_id="42",
                reason=parked.reason,
                error=parked.error,
                parked_at=parked.parked_at,
                replay_count=1,
            )
            await queue.republish(parked)
            await mark_replayed(
                store.engine, request_id="once", parked_at=parked.parked_at, at=datetime.now(UTC)
            )
        # (leaving the block without the ack hands the parked copy back, as a crash would)
    finally:
        await store.close()
    assert await depth(upstream, "failed") == 1
    assert await depth(upstream, "training") == 1
    # When the replay runs again
    done = deployflag("failed", "replay", "--all", env=cli_env(service_env))
    assert done.returncode == 0, done.stderr
    assert b"already replayed" in done.stdout
    # Then the parked copy is gone and the training queue still holds one copy, not two
    assert await depth(upstream, "failed") == 0
    assert await depth(upstream, "training") == 1
    [copy] = await upstream.drain("training", 1, timeout=10)
    assert copy.body == WORKED
    assert copy.message_id == "once"
    assert copy.content_type == "application/json"
    assert copy.headers == {"x-deployflag-replays": 1}
