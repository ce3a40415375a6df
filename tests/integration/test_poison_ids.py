"""Ids the database would refuse, and a reused id with another body, against `serve` on the real
RabbitMQ with SQLite and with PostgreSQL: the same answer on both, nothing requeued for ever."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.broker import ServiceProcess, Upstream
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = orjson.loads((ROOT / "examples" / "worked-example.json").read_bytes())


def body(**changes: Any) -> bytes:
    return orjson.dumps({**WORKED, **changes})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, service_env: dict[str, str]) -> dict[str, str]:
    if request.param == "sqlite":
        return service_env
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = cluster.fresh_database(f"ids_{uuid.uuid4().hex[:10]}")
    return {**service_env, "DEPLOYFLAG_DATABASE_URL": url, "DEPLOYFLAG_AUTO_MIGRATE": "true"}


async def test_hostile_ids_are_parked_and_a_reused_id_never_gets_another_repos_result(
    start_service: Callable[..., ServiceProcess], env: dict[str, str], upstream: Upstream
) -> None:
    service = start_service(env)
    # A request R for repo 42 is answered
    await upstream.publish(body(), message_id="R")
    [first] = await upstream.drain("save_result", 1, timeout=90)
    assert orjson.loads(first.body)["repo_id"] == 42
    # Then hostile messages, and one valid request behind them
    hostile = {
        "nul-in-id": (body(), "nul\x00id", "bad_request_id"),
        "repo-id-300": (body(repo_id="r" * 300), "repo-300", "invalid_field"),
        "nul-in-repo-id": (body(repo_id="a\x00b"), "repo-nul", "invalid_field"),
        "repo-id-301-digits": (
            orjson.dumps(WORKED).replace(b'"repo_id":42', b'"repo_id":' + b"9" * 301),
            "repo-301",
            "invalid_field",
        ),
        "reused-id": (body(repo_id=99), "R", "id_conflict"),
    }
    for payload, message_id, _ in hostile.values():
        await upstream.publish(payload, message_id=message_id)
    await upstream.publish(body(), message_id="valid-after")
    [reply] = await upstream.drain("save_result", 1, timeout=90)
    assert reply.correlation_id == "valid-after"
    parked = await upstream.drain("failed", len(hostile), timeout=60)
    reasons = sorted(str(m.headers["x-deployflag-reason"]) for m in parked)
    assert reasons == sorted(reason for _, _, reason in hostile.values())
    [conflict] = [m for m in parked if m.headers["x-deployflag-reason"] == "id_conflict"]
    error = str(conflict.headers["x-deployflag-error"])
    assert "'R'" in error
    assert "'42'" in error
    assert "99" in error
    # Nothing else was answered (repo 99's request got no answer from repo 42's result)
    assert await upstream.count("save_result") == 0
    assert await upstream.count("training") == 0
    errors = [line for line in service.log_lines() if line.get("level") in ("error", "critical")]
    assert errors == []
    assert service.stop() == 0
