"""Start-up, signals and the health port against the real RabbitMQ and PostgreSQL.

The database "outage" at start is a TCP forwarder in front of the throwaway PostgreSQL that is
not listening yet: the service sees connection refused, exactly as with a database restarting.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.integration.test_service import in_flight
from tests.support.broker import ServiceProcess, Upstream
from tests.support.payloads import SLOW_TRAINING
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import async_wait_until, free_port

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()


class Forwarder:
    """A TCP forwarder on ``port`` to PostgreSQL, listening only once :meth:`open` is called."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def pg_behind_forwarder(
    postgres: PostgresCluster, service_env: dict[str, str]
) -> AsyncIterator[tuple[dict[str, str], Forwarder]]:
    postgres.fresh_database(name := f"start_{uuid.uuid4().hex[:10]}")
    forwarder = Forwarder(postgres.port)
    env = {
        **service_env,
        "DEPLOYFLAG_DATABASE_URL": postgres.url_for(name, port=forwarder.port),
        "DEPLOYFLAG_AUTO_MIGRATE": "true",
    }
    yield env, forwarder
    await forwarder.close()


def waits_for_database(service: ServiceProcess) -> bool:
    return any(line.get("event") == "database not reachable yet" for line in service.log_lines())


async def is_ready(service: ServiceProcess) -> bool:
    return await asyncio.to_thread(service.is_ready)


@pytest.mark.postgres
async def test_the_service_waits_for_the_database_at_start(
    start_service: Callable[..., ServiceProcess],
    pg_behind_forwarder: tuple[dict[str, str], Forwarder],
    upstream: Upstream,
) -> None:
    env, forwarder = pg_behind_forwarder
    service = start_service(env, ready=False)
    await async_wait_until(lambda: waits_for_database(service), 60, "the database wait")
    assert service.proc is not None
    assert service.proc.poll() is None, "exited instead of waiting for the database"
    await forwarder.open()  # the database is back
    await async_wait_until(lambda: is_ready(service), 90, "the service to become ready")
    await upstream.publish(WORKED, message_id="after-db-came-up")
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == "after-db-came-up"


@pytest.mark.postgres
async def test_a_signal_during_start_up_stops_before_consuming(
    start_service: Callable[..., ServiceProcess],
    pg_behind_forwarder: tuple[dict[str, str], Forwarder],
    upstream: Upstream,
) -> None:
    env, _ = pg_behind_forwarder
    await upstream.publish(WORKED, message_id="must-stay-queued")
    service = start_service(env, ready=False)
    await async_wait_until(lambda: waits_for_database(service), 60, "the database wait")
    service.signal(signal.SIGTERM)
    assert service.wait(timeout=60) == 0
    assert await upstream.count("training") == 1
    assert await upstream.consumers("training") == 0
    assert not [line for line in service.log_lines() if line.get("event") == "request finished"]


async def test_sighup_drains_like_sigterm(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    large_payload: bytes,
) -> None:
    service = start_service(service_env, **SLOW_TRAINING)
    await upstream.publish(large_payload, message_id="through-a-hangup")
    await async_wait_until(lambda: in_flight(service) == 1, 60, "the request to be in flight")
    service.signal(signal.SIGHUP)
    assert service.wait(timeout=120) == 0
    [reply] = await upstream.drain("save_result", 1, timeout=10)
    assert reply.correlation_id == "through-a-hangup"
    assert await upstream.count("training") == 0


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_idle_health_connections_are_capped_and_timed_out(
    start_service: Callable[..., ServiceProcess], service_env: dict[str, str]
) -> None:
    service = start_service(
        service_env, DEPLOYFLAG_HTTP_MAX_CONNECTIONS="20", DEPLOYFLAG_HTTP_IDLE_TIMEOUT="2"
    )
    idle = []
    try:
        for _ in range(100):  # connections that never send a request
            sock = socket.create_connection(("127.0.0.1", service.http_port), timeout=5)
            sock.setblocking(False)
            idle.append(sock)
        # A probe still gets in, however many idle connections there are
        assert await is_ready(service)
        # All but the newest few were closed to make room; and the rest time out
        await async_wait_until(
            lambda: sum(_closed_by_peer(s) for s in idle) >= 80, 10, "the oldest to be closed"
        )
        await async_wait_until(
            lambda: all(_closed_by_peer(s) for s in idle), 30, "idle connections to time out"
        )
    finally:
        for sock in idle:
            sock.close()
    assert await is_ready(service)
