"""sd_notify by hand: datagrams to a socket the test owns, watchdog parsing and pinging."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployflag import systemd
from deployflag.health import Health


@pytest.fixture
def path_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket at a filesystem path (short: AF_UNIX paths stop at 108 bytes)."""
    with (
        tempfile.TemporaryDirectory(prefix="dfsd-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        path = str(Path(directory) / "notify")
        sock.bind(path)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A notify socket in the abstract namespace, as systemd names it: ``@name``."""
    name = f"deployflag-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_to_a_path_socket(path_socket: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=consuming deployflag_training") is True
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=consuming deployflag_training"


def test_notify_to_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert systemd.notify("STOPPING=1") is True
    assert abstract_socket.recv(4096) == b"STOPPING=1"


def test_notify_to_a_vanished_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/deployflag/notify")
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a transport we do not speak
    assert systemd.notify("READY=1") is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "abc"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "60000000"}, 60.0),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "1500000", "WATCHDOG_PID": "x"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(env) == expected


async def recv_datagram(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)


async def test_watchdog_pings_only_while_the_loop_is_healthy(
    path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s: a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # Given a loop whose monitor has not ticked for longer than the stall bound
    health = Health(stall_seconds=1.0)
    health.record_tick(time.monotonic() - 30, 0.0)
    task = asyncio.create_task(systemd.watchdog_task(health))
    try:
        # When a few ping periods pass, nothing is sent (a window is the only way to see "none")
        await asyncio.sleep(0.35)
        path_socket.setblocking(False)
        with pytest.raises(BlockingIOError):
            path_socket.recv(4096)
        # And when the loop is healthy again, the pings resume
        health.record_tick(time.monotonic(), 0.0)
        assert await recv_datagram(path_socket) == b"WATCHDOG=1"
        health.record_tick(time.monotonic(), 0.0)
        assert await recv_datagram(path_socket) == b"WATCHDOG=1"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watchdog_task_ends_at_once_without_a_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    await asyncio.wait_for(systemd.watchdog_task(Health()), timeout=1.0)
