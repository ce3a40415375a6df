"""Fixtures for tests against the real RabbitMQ and a real `deployflag serve` process.

Every test session gets its own vhost; every test its own exchange and queue names, so tests
never see each other's messages. The service under test is a subprocess, stopped with real signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.support.toolkit import Names, Proc, free_port, request_message, vhost, wait_until

RABBIT_HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def rabbit_url() -> Iterator[str]:
    """An AMQP URL on a vhost of this test session's own."""
    try:
        with vhost("deployflag-test", f"{RABBIT_HOST}:5672") as url:
            yield url
    except RuntimeError as exc:
        pytest.fail(f"RabbitMQ is not usable ({exc}): run `scripts/services.sh rabbitmq`")


@pytest.fixture
def names() -> Names:
    return Names()


class ServiceProcess:
    """`python -m deployflag serve` in a subprocess, with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.http_port = int(env["DEPLOYFLAG_HTTP_PORT"])
        self.runner: Proc | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.runner is None else self.runner.popen

    def start(self) -> ServiceProcess:
        argv = [sys.executable, "-m", "deployflag", "serve"]
        self.runner = Proc("deployflag serve", argv, self.env, self.log_path)
        return self

    def readyz(self) -> tuple[int, dict[str, Any]] | None:
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return None

    def is_ready(self) -> bool:
        answer = self.readyz()
        return answer is not None and answer[0] == 200

    def wait_ready(self, timeout: float = 60) -> ServiceProcess:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"service exited with {self.proc.returncode}:\n{self.log()}")
            return self.is_ready()

        wait_until(ready, timeout, "the service to become ready", every=0.1)
        return self

    def signal(self, signum: int) -> None:
        assert self.runner is not None
        self.runner.signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.runner is not None
        return self.runner.wait(timeout)

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.runner is not None
        if self.runner.alive():
            self.runner.signal(signal.SIGTERM)
        try:
            return self.runner.wait(timeout)
        finally:
            self.runner.close_log()

    def kill(self) -> None:
        """SIGKILL to the service and its pool's workers."""
        if self.runner is not None:
            self.runner.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    lines.append(json.loads(line))
        return lines


@pytest.fixture
def service_env(tmp_path: Path, rabbit_url: str, names: Names) -> dict[str, str]:
    """Environment for a service under test: its own names, SQLite file and HTTP port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYFLAG_")}
    env.update(names.env())
    env.update(
        {
            "DEPLOYFLAG_AMQP_URL": rabbit_url,
            "DEPLOYFLAG_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'deployflag.db'}",
            "DEPLOYFLAG_HTTP_PORT": str(free_port()),
            "DEPLOYFLAG_WORKERS": "2",
            "DEPLOYFLAG_LOG_FORMAT": "json",
            "DEPLOYFLAG_LOG_LEVEL": "INFO",
            "DEPLOYFLAG_DRAIN_TIMEOUT": "60",
            "DEPLOYFLAG_RETRY_BACKOFF_INITIAL": "0.2",
            "DEPLOYFLAG_RETRY_BACKOFF_MAX": "2",
        }
    )
    return env


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: start a service (optionally with extra env); every one is stopped at teardown."""
    started: list[ServiceProcess] = []

    def start(env: dict[str, str], ready: bool = True, **extra: str) -> ServiceProcess:
        merged = {**env, **extra}
        if len(started) > 0 and "DEPLOYFLAG_HTTP_PORT" not in extra:
            merged["DEPLOYFLAG_HTTP_PORT"] = str(free_port())
        service = ServiceProcess(merged, tmp_path / f"service-{len(started)}.log").start()
        started.append(service)
        return service.wait_ready() if ready else service

    yield start
    for service in started:
        service.kill()


class Upstream:
    """The upstream's side of the broker: publish requests, read replies and parked messages."""

    def __init__(self, url: str, names: Names) -> None:
        self.url = url
        self.names = names

    async def __aenter__(self) -> Upstream:
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(
            self.names.exchange, aio_pika.ExchangeType.DIRECT, durable=True
        )
        for kind in ("collect_data", "training", "save_result", "failed"):
            queue = await self.channel.declare_queue(self.names.queue(kind), durable=True)
            await queue.bind(self.exchange, self.names.queue(kind))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.connection.close()

    async def publish(
        self,
        body: bytes,
        *,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        reply_to: str | None = None,
    ) -> None:
        message = request_message(body, message_id, headers, content_type, reply_to)
        await self.exchange.publish(message, routing_key=self.names.queue("training"))

    async def drain(self, kind: str, count: int, timeout: float) -> list[aio_pika.IncomingMessage]:
        """Take ``count`` messages from a queue (acking them), failing after ``timeout``."""
        queue = await self.channel.get_queue(self.names.queue(kind))
        got: list[aio_pika.IncomingMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            message = await queue.get(fail=False, timeout=5)
            if message is None:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{len(got)} of {count} messages on {kind} after {timeout} s"
                    )
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            got.append(message)  # type: ignore[arg-type]
        return got

    async def count(self, kind: str) -> int:
        queue = await self.channel.declare_queue(self.names.queue(kind), passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def consumers(self, kind: str) -> int:
        queue = await self.channel.declare_queue(self.names.queue(kind), passive=True)
        return int(queue.declaration_result.consumer_count or 0)


@pytest.fixture
async def upstream(rabbit_url: str, names: Names) -> AsyncIterator[Upstream]:
    async with Upstream(rabbit_url, names) as up:
        yield up
