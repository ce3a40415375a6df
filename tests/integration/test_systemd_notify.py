"""`serve` speaks systemd's notify protocol: READY=1 once consuming, WATCHDOG=1, STOPPING=1."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.support.broker import ServiceProcess

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """An abstract-namespace datagram socket, as systemd gives a Type=notify service."""
    name = f"@deployflag-test-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.settimeout(0.5)
    yield name, sock
    sock.close()


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every datagram received until one contains ``wanted``; fails after ``timeout``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(data)
        if wanted in data.splitlines():
            return seen
    raise AssertionError(f"no {wanted!r} within {timeout} s; got {seen}")


def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    notify_socket: tuple[str, socket.socket],
) -> None:
    name, sock = notify_socket
    service = start_service(service_env, NOTIFY_SOCKET=name, WATCHDOG_USEC="2000000")
    seen = receive_until(sock, "READY=1", timeout=30)
    assert any("STATUS=consuming" in message for message in seen)
    assert service.is_ready(), "READY=1 is sent once the consumer is registered"
    receive_until(sock, "WATCHDOG=1", timeout=10)
    service.signal(signal.SIGTERM)
    receive_until(sock, "STOPPING=1", timeout=30)
    assert service.wait(timeout=60) == 0
