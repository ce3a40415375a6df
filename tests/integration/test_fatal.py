"""A fatal database error under a running service: the request is kept, the service exits 78.

Configuration, credentials or schema trouble cannot be retried away and must not park the request
(its data is fine). Each test breaks the database under a serving process, sends one request, and
checks: the request is back in the training queue (not parked, trained at most once), the process
exits with RET_CONFIG, and once the fault is repaired a restarted service answers it.
"""

from __future__ import annotations

import secrets
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from deployflag import exitcodes
from tests.support.broker import ServiceProcess, Upstream
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import async_wait_until

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
DRAIN_TIMEOUT = 30.0
# The idle database watcher would find the fault on its own; these tests want it found by the
# request in flight, so the watcher is kept out of the way.
QUIET_WATCHER = {"DEPLOYFLAG_DATABASE_CHECK_INTERVAL": "3600"}


def finished(service: ServiceProcess) -> list[tuple[str, str | None]]:
    return [
        (line["outcome"], line.get("reason"))
        for line in service.log_lines()
        if line.get("event") == "request finished"
    ]


async def assert_kept_and_stopped(service: ServiceProcess, upstream: Upstream) -> None:
    """The service exits RET_CONFIG within the drain timeout, the request back in its queue."""
    assert service.wait(timeout=DRAIN_TIMEOUT + 30) == exitcodes.RET_CONFIG, service.log()
    await async_wait_until(
        lambda: _count_is(upstream, "training", 1),
        timeout=30,
        what="the request back in the training queue",
    )
    assert await upstream.count("failed") == 0, "a fatal error must not park the request"
    assert await upstream.count("save_result") == 0
    assert finished(service) == [("requeued", "fatal")]


async def _count_is(upstream: Upstream, kind: str, expected: int) -> bool:
    return await upstream.count(kind) == expected


async def test_a_table_dropped_under_a_sqlite_service_stops_it_with_78_and_keeps_the_request(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
) -> None:
    service = start_service(
        service_env, DEPLOYFLAG_DRAIN_TIMEOUT=str(DRAIN_TIMEOUT), **QUIET_WATCHER
    )
    path = service_env["DEPLOYFLAG_DATABASE_URL"].split("///", 1)[1]
    with sqlite3.connect(path) as db:
        ddl = [
            sql
            for (sql,) in db.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'model_performance_metadata' "
                "AND sql IS NOT NULL ORDER BY type DESC"  # the table before its indexes
            )
        ]
        db.execute("DROP TABLE model_performance_metadata")
    request_id = f"fatal-{uuid.uuid4().hex[:8]}"
    await upstream.publish(WORKED, message_id=request_id)

    await assert_kept_and_stopped(service, upstream)
    with sqlite3.connect(path) as db:
        attempts = db.execute(
            "SELECT attempts FROM training_request WHERE request_id = ?", (request_id,)
        ).fetchall()
    # A small first delivery claims and records in one transaction, so the failed record takes
    # its claim with it: no attempt is charged to the request for the database's fault. The
    # single "requeued" line above shows it was tried once, not retried to the attempt limit.
    assert attempts == [], "the claim rolled back with the record it was folded into"

    # The repair: the table restored as it was. A restarted service answers the request.
    with sqlite3.connect(path) as db:
        for statement in ddl:
            db.execute(statement)
    start_service(service_env, **QUIET_WATCHER)
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == request_id
    assert await upstream.count("failed") == 0


@pytest.mark.postgres
async def test_a_password_changed_under_a_postgresql_service_stops_it_with_78(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    postgres: PostgresCluster,
) -> None:
    # A role and database of this test's own: the session's role keeps its password.
    role = f"fatal_{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(12)
    postgres.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    postgres.psql(f"CREATE DATABASE {role} OWNER {role}")
    url = URL.create(
        "postgresql+asyncpg",
        username=role,
        password=password,
        host=postgres.host,
        port=postgres.port,
        database=role,
    ).render_as_string(hide_password=False)
    env = {
        **service_env,
        **QUIET_WATCHER,
        "DEPLOYFLAG_DATABASE_URL": url,
        "DEPLOYFLAG_AUTO_MIGRATE": "true",
        "DEPLOYFLAG_DRAIN_TIMEOUT": str(DRAIN_TIMEOUT),
    }
    service = start_service(env)
    # The password is revoked, and the service's open sessions end (as a failover or a
    # connection recycle would end them): its next connection is refused.
    postgres.psql(f"ALTER ROLE {role} PASSWORD '{secrets.token_urlsafe(12)}'")
    postgres.psql(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    )
    request_id = f"fatal-{uuid.uuid4().hex[:8]}"
    await upstream.publish(WORKED, message_id=request_id)

    await assert_kept_and_stopped(service, upstream)
    assert password not in service.log()
    rows = postgres.psql(
        f"SELECT count(*) FROM model_performance_metadata WHERE request_id = '{request_id}'",
        database=role,
    )
    assert rows.split()[:3] == ["count", "-------", "0"]

    postgres.psql(f"ALTER ROLE {role} PASSWORD '{password}'")
    start_service(env)
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == request_id
    assert await upstream.count("failed") == 0
