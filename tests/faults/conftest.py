"""Fixtures of the fault suite: a broker of its own, and the results table.

* ``broker`` — a private RabbitMQ node (see node.py) for the session; ``rabbit_url`` is overridden
  here so every fixture of tests/support/broker.py (``service_env``, ``upstream`` …) uses it.
* ``fault_table`` — each scenario adds its :class:`FaultRow`; at the end of the session the rows
  are written to ``benchmarks/results/faults.md`` (``make faults-report`` prints it).
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.faults.harness import FaultRow, Tally, metadata_ids
from tests.faults.node import BrokerError, BrokerNode
from tests.support.broker import ServiceProcess
from tests.support.postgres import PostgresCluster

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "faults.md"
ROWS: pytest.StashKey[list[FaultRow]] = pytest.StashKey()
IMPORTED = time.monotonic()  # this conftest is loaded before the suite's first fixture runs


# --- the broker -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerNode]:
    private = os.environ.get("DEPLOYFLAG_FAULTS_BROKER", "private") != "shared"
    node = BrokerNode(private=private)
    try:
        node.start()
    except (BrokerError, OSError, subprocess.SubprocessError) as exc:
        node.shutdown()
        pytest.fail(f"could not start a RabbitMQ node for the fault suite: {exc}", pytrace=False)
    try:
        yield node
    finally:
        # Whatever a scenario did: the app running and the consumer timeout at its default.
        try:
            node.start_app()
            node.eval("application:set_env(rabbit, consumer_timeout, 1800000).")
            node.eval("application:set_env(rabbit, channel_tick_interval, 60000).")
        finally:
            node.shutdown()


@pytest.fixture(scope="session")
def rabbit_url(broker: BrokerNode) -> Iterator[str]:
    """An AMQP URL on a vhost of the fault session's own, on the fault suite's broker."""
    vhost = f"deployflag-faults-{uuid.uuid4().hex[:8]}"
    broker.ctl("add_vhost", vhost)
    broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield broker.url(vhost)
    try:
        broker.start_app()
        broker.ctl("delete_vhost", vhost)
    except BrokerError:
        pass  # a private node is thrown away anyway


# --- services ----------------------------------------------------------------------------------


@pytest.fixture
def start_service(
    start_service: Callable[..., ServiceProcess],
) -> Iterator[Callable[..., ServiceProcess]]:
    """tests/support's factory, and at teardown SIGKILL to every service's process group even
    when the service itself has exited: nothing a scenario started outlives it."""
    groups: list[int] = []

    def start(env: dict[str, str], ready: bool = True, **extra: str) -> ServiceProcess:
        service = start_service(env, ready=False, **extra)
        assert service.proc is not None
        groups.append(service.proc.pid)  # start_new_session: the group id is the pid
        return service.wait_ready() if ready else service

    yield start
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)


# --- the results table ------------------------------------------------------------------------


class FaultTable:
    def __init__(self, rows: list[FaultRow]) -> None:
        self._rows = rows

    async def record(
        self,
        tally: Tally,
        scenario: str,
        services: Sequence[ServiceProcess],
        **expected: int,
    ) -> FaultRow:
        """The scenario's row, added to the table, then checked: nothing lost, nothing trained
        twice, and each ``expected`` column (``replies=1``, ``parked=0``…) as given. The
        services share one database; the metadata rows are counted there."""
        database_url = services[0].env["DEPLOYFLAG_DATABASE_URL"]
        row = tally.row(scenario, await metadata_ids(database_url), services)
        self._rows.append(row)
        assert row.lost == 0, row
        assert row.duplicates == 0, row
        assert {name: getattr(row, name) for name in expected} == expected, row
        return row


@pytest.fixture
def fault_table(request: pytest.FixtureRequest) -> FaultTable:
    return FaultTable(request.config.stash.setdefault(ROWS, []))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    rows = session.config.stash.get(ROWS, [])
    if not rows or os.environ.get("DEPLOYFLAG_FAULTS_REPORT") != "1":
        return  # only `make test-faults` (the whole suite) rewrites the table, not ad-hoc runs
    seconds = time.monotonic() - IMPORTED
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(render(rows, seconds, exitstatus))


def render(rows: list[FaultRow], seconds: float, exitstatus: int) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    where = (
        f"{socket.gethostname()} ({os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()})"
    )
    verdict = "passed" if exitstatus == 0 else f"FAILED (pytest exit status {exitstatus})"
    lines = [
        f"Fault suite (`make test-faults`) run {when} on {where}: {len(rows)} scenarios in "
        f"{seconds:.0f} s, {verdict}.",
        "",
        "| scenario | sent | replies | rows | parked | lost | duplicates | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda row: row.scenario):
        lines.append(
            f"| {r.scenario} | {r.sent} | {r.replies} | {r.rows} | {r.parked} | {r.lost} "
            f"| {r.duplicates} | {r.seconds:.1f} |"
        )
    lines += [
        "",
        "sent: requests the broker confirmed · replies: distinct correlation ids on the result "
        "queue · rows: distinct request ids in model_performance_metadata · parked: distinct "
        "requests on the failed queue · lost = sent − answered − parked · duplicates: request ids "
        "with more than one `outcome=ok` log line across all instances (trained twice).",
        "",
    ]
    return "\n".join(lines)


# --- a shared PostgreSQL database -------------------------------------------------------------


@pytest.fixture
def pg_env(service_env: dict[str, str], postgres: PostgresCluster) -> dict[str, str]:
    """``service_env`` on a fresh PostgreSQL database of the session's cluster, migrated at
    start: what several instances share."""
    url = postgres.fresh_database(f"faults_{uuid.uuid4().hex[:10]}")
    return {**service_env, "DEPLOYFLAG_DATABASE_URL": url, "DEPLOYFLAG_AUTO_MIGRATE": "true"}
