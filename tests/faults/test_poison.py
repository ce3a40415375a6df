"""p. Poison messages ahead of valid requests, on SQLite and on PostgreSQL.

Every kind a hostile or merely different producer can send — headers pamqp decodes but cannot
encode again, properties it cannot decode at all, headers too large for a parked copy, ids the
database refuses, a reused id with another body, a request past the shortcode cap — published
with aiormq (pamqp's encoders overridden) ahead of valid requests. Every valid request must be
answered, every poison message parked, none lost or trained twice, and the log must stay short.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally
from tests.support.broker import ServiceProcess
from tests.support.poison import kinds, raw_publisher
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import Names, async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED: dict[str, Any] = orjson.loads((ROOT / "examples" / "worked-example.json").read_bytes())
MAX_SHORTCODES = 50
VALID = 5


def request(**changes: Any) -> bytes:
    return orjson.dumps({**WORKED, **changes})


def many_shortcodes(count: int) -> bytes:
    rows = [
        {"timestamp": "2021-01-01T00:00:00", "shortcode": f"SC-{i}", "frequency": 1}
        for i in range(count)
    ]
    return orjson.dumps({"repo_id": 7, "analysis_run": [], "historical_run": rows})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, service_env: dict[str, str]) -> dict[str, str]:
    if request.param == "sqlite":
        return service_env
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = cluster.fresh_database(f"poison_{uuid.uuid4().hex[:10]}")
    return {**service_env, "DEPLOYFLAG_DATABASE_URL": url, "DEPLOYFLAG_AUTO_MIGRATE": "true"}


async def test_poison_messages_ahead_of_valid_requests(
    start_service: Callable[..., ServiceProcess],
    env: dict[str, str],
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    backend = "PostgreSQL" if env["DEPLOYFLAG_DATABASE_URL"].startswith("postgresql") else "SQLite"
    service = start_service(env, DEPLOYFLAG_MAX_SHORTCODES=str(MAX_SHORTCODES))
    expected: dict[str, str] = {}  # the parked copy's message id → its reason
    anonymous: dict[str, str] = {}  # request id (the body's hash) → reason, no message id
    async with Tally(rabbit_url, names) as tally:
        # A request R for repo 42, answered: its id is reused below with another body.
        await tally.publish(request(), message_id="R")
        await tally.settle(timeout=60, what="R to be answered")
        async with raw_publisher(rabbit_url, names) as publish:
            for index, kind in enumerate(kinds()):
                body = kind.body or request(repo_id=1000 + index)
                properties = kind.properties(kind.request_id)
                await publish(body, properties)
                if isinstance(properties.get("message_id"), str):
                    tally.sent[kind.request_id] = None
                    expected[kind.request_id] = kind.reason
                else:  # no decodable message id: recorded under the body's hash
                    anonymous[hashlib.sha256(body).hexdigest()] = kind.reason
        for message_id, body, reason in [
            ("nul-in-id\x00", request(), "bad_request_id"),
            ("repo-id-300", request(repo_id="r" * 300), "invalid_field"),
            ("nul-in-repo-id", request(repo_id="a\x00b"), "invalid_field"),
            ("too-many-shortcodes", many_shortcodes(MAX_SHORTCODES + 1), "too_many_shortcodes"),
        ]:
            await tally.publish(body, message_id=message_id)
            expected[message_id] = reason
        await tally.publish(request(repo_id=99), message_id="R")  # the reused id
        for i in range(VALID):
            await tally.publish(request(repo_id=2000 + i), message_id=f"valid-{i}")
        try:
            await tally.settle(timeout=120)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}: {tally.unanswered()}, parked {set(tally.parked)}"
            ) from None
        await async_wait_until(lambda: "R" in tally.parked, 60, "the reused id to be parked")

        def parked_anonymous() -> dict[str, str]:
            return {
                str(copy.request_id): copy.reason
                for copy in tally.parked.values()
                if copy.request_id in anonymous
            }

        await async_wait_until(
            lambda: parked_anonymous() == anonymous, 60, "the message without an id parked"
        )
        # Nothing lost, nothing trained twice; R counts once among the sent ids: as answered
        # too, and as parked (its reused copy)
        await fault_table.record(
            tally,
            f"p. poison messages ({len(expected) + len(anonymous) + 1} kinds) ahead of "
            f"{VALID} valid, {backend}",
            [service],
            parked=len(expected) + 1,
        )
    # Every valid request answered (R once, with its own result), nothing else answered
    assert set(tally.replies) == {"R", *(f"valid-{i}" for i in range(VALID))}
    assert tally.replies["R"] == 1
    # Every poison message parked, with its reason
    reasons = {key: tally.parked[key].reason for key in expected}
    assert reasons == expected
    assert tally.parked["R"].reason == "id_conflict"
    assert len(tally.parked) == len(expected) + len(anonymous) + 1  # and nothing else parked
    # The log stays short: fewer than 10 error lines per poison message
    errors = [line for line in service.log_lines() if line.get("level") in ("error", "critical")]
    assert len(errors) < 10 * (len(expected) + len(anonymous) + 1)
    assert service.stop() == 0
