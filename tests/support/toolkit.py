"""The helpers every test and benchmark needs, once: ports, waiting, RabbitMQ vhosts, /metrics,
child processes.

Plain Python, no pytest: the benchmarks import it too (``sys.path`` gets the repository root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from prometheus_client.parser import text_string_to_metric_families

RABBIT = "127.0.0.1:5672"

# --- ports and waiting -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TimedOut(AssertionError):
    """A condition waited for did not come true in time (an assertion failure in a test)."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that; fail with
    :class:`TimedOut` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


async def async_wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05
) -> Any:
    """:func:`wait_until` for a loop: ``predicate`` may return an awaitable."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or asyncio.isfuture(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)


# --- RabbitMQ ----------------------------------------------------------------------------------


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    """Run ``rabbitmqctl -q ARGS`` against the local node; its output, or RuntimeError."""
    if shutil.which("rabbitmqctl") is None:
        raise RuntimeError("rabbitmqctl not found: run `scripts/services.sh test-deps`")
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def vhost(prefix: str, host: str = RABBIT) -> Iterator[str]:
    """An AMQP URL on a fresh vhost (guest has every permission), deleted afterwards."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{host}/{name}"
    finally:
        with contextlib.suppress(Exception):
            rabbitmqctl("delete_vhost", name)


@dataclass(frozen=True)
class Names:
    """Exchange and queue names of their own, so tests and benchmark runs never see each
    other's messages."""

    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def exchange(self) -> str:
        return f"deployflag-{self.suffix}"

    def queue(self, kind: str) -> str:
        return f"deployflag_{kind}-{self.suffix}"

    @property
    def training(self) -> str:
        return self.queue("training")

    @property
    def result(self) -> str:
        return self.queue("save_result")

    def env(self) -> dict[str, str]:
        return {
            "DEPLOYFLAG_EXCHANGE": self.exchange,
            "DEPLOYFLAG_COLLECT_QUEUE": self.queue("collect_data"),
            "DEPLOYFLAG_TRAINING_QUEUE": self.training,
            "DEPLOYFLAG_RESULT_QUEUE": self.result,
            "DEPLOYFLAG_FAILED_QUEUE": self.queue("failed"),
        }


def request_message(
    body: bytes,
    message_id: str | None = None,
    headers: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
    reply_to: str | None = None,
) -> aio_pika.Message:
    """A training request as the upstream publishes it: persistent, with these properties."""
    return aio_pika.Message(
        body=body,
        message_id=message_id,
        headers=headers or {},
        content_type=content_type,
        reply_to=reply_to,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


# --- /metrics ----------------------------------------------------------------------------------

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def read_metrics(port: int, timeout: float = 5) -> Samples | None:
    """``/metrics`` on ``port`` as {sample name: {sorted labels: value}}; None if unreachable."""
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[key] = sample.value
    return samples


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of ``/metrics`` (None when the endpoint or the series is not there)."""
    samples = read_metrics(port, timeout=2)
    if samples is None:
        return None
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


# --- child processes ---------------------------------------------------------------------------


class Proc:
    """A child process in a session of its own, its output in a log file.

    Signals sent to the session reach the child and everything it started (pool workers, Celery
    children), and nothing else.
    """

    live: set[Proc] = set()  # noqa: RUF012  (every Proc not yet stopped, for emergency cleanup)

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = log.open("ab")
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        Proc.live.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}; log tail:\n{self.log_tail()}"
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log().splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        """``signum`` to the child alone."""
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL to the whole session, and wait for the child."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=30)
        self._close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the session, wait, then SIGKILL whatever is left of it."""
        if not self.alive():
            print(
                f"{self.name} (pid {self.pid}) had exited with {self.popen.returncode}",
                file=sys.stderr,
            )
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers: pool workers, Celery children
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._close()

    def close_log(self) -> None:
        self._log.close()

    def _close(self) -> None:
        self._log.close()
        Proc.live.discard(self)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(cls.live):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)


def rabbit_node_env(name: str, host: str, port: int, dist_port: int, base: Path) -> dict[str, str]:
    """What gives one rabbitmq-server node its own name, ports and files under ``base``."""
    return {
        "RABBITMQ_NODENAME": name,
        "RABBITMQ_NODE_IP_ADDRESS": host,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
