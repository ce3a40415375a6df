"""SQLite on a disk that fills up, and on one that turns read-only, under a stream of requests.

The database lives on a small tmpfs of the test's own. "Full": a filler file takes every free
block; "read-only": the mount is remounted ``ro`` under the running service (root bypasses file
permissions, so a ``chmod`` would prove nothing). Either way writes fail; the store reports it as
transient, the handler keeps the deliveries unacked and retries with backoff, nothing is parked
for it, and once space or write access returns the service catches up: every request answered
once, none lost, none trained twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally, metadata_ids, queue_counts
from tests.support.broker import Names, ServiceProcess
from tests.support.toolkit import async_wait_until

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
MOUNT_SIZE = "16m"
FAULT_SECONDS = 20.0
REQUESTS = 200


class SmallDisk:
    """A tmpfs mounted for one test (root and a kernel that allows it)."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="deployflag-disk-", dir="/tmp"))
        self.filler = self.path / "filler"

    def _mount(self, *options: str) -> None:
        done = subprocess.run(
            ["mount", *options], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"mount {' '.join(options)}: {done.stderr.strip()}")

    def mount(self) -> None:
        self._mount("-t", "tmpfs", "-o", f"size={MOUNT_SIZE},mode=0755", "tmpfs", str(self.path))

    def fill(self) -> None:
        """Take every free block (dd stops at ENOSPC)."""
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={self.filler}", "bs=64k"],
            capture_output=True,
            timeout=60,
            check=False,
        )

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, ro: bool) -> None:
        self._mount("-o", f"remount,{'ro' if ro else 'rw'}", str(self.path))

    def unmount(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            self._mount("-o", "remount,rw", str(self.path))
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            self.path.rmdir()


@pytest.fixture
def small_disk() -> Iterator[SmallDisk]:
    disk = SmallDisk()
    try:
        disk.mount()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        with contextlib.suppress(OSError):
            disk.path.rmdir()
        pytest.fail(f"the disk scenarios need a tmpfs mount (root): {exc}", pytrace=False)
    try:
        yield disk
    finally:
        disk.unmount()


def write_failures(service: ServiceProcess) -> int:
    return sum(
        1
        for line in service.log_lines()
        if line.get("event") == "transient failure" and line.get("stage") in ("claim", "record")
    )


async def test_sqlite_disk_full_during_a_stream(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    small_disk: SmallDisk,
    fault_table: FaultTable,
) -> None:
    database_url = f"sqlite+aiosqlite:///{small_disk.path / 'deployflag.db'}"
    service = start_service(
        service_env,
        DEPLOYFLAG_DATABASE_URL=database_url,
        DEPLOYFLAG_WORKERS="2",
        DEPLOYFLAG_RETRY_BACKOFF_MAX="1",
    )
    async with Tally(rabbit_url, names) as tally:

        async def stream() -> None:
            for i in range(REQUESTS):
                await tally.publish(WORKED, message_id=f"req-{i:03d}")
                await asyncio.sleep(0.1)  # ten a second: the fault lands mid-stream

        publisher = asyncio.create_task(stream())
        try:
            await async_wait_until(lambda: len(tally.replies) >= 20, 60, "20 replies")
            try:
                await asyncio.to_thread(small_disk.fill)
                await async_wait_until(
                    lambda: write_failures(service) > 0, 60, "the store to fail a write"
                )
                answered_at_fault = len(tally.replies)
                await asyncio.sleep(FAULT_SECONDS)  # the fault lasts this long, by design
                stalled = len(tally.replies) - answered_at_fault
            finally:
                await asyncio.to_thread(small_disk.free)
            await asyncio.wait_for(publisher, timeout=120)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        await tally.settle(timeout=180)
        await async_wait_until(service.is_ready, 60, "the service ready again")
        rows = await metadata_ids(database_url)
        row = fault_table.add(
            tally.row(
                f"SQLite disk full for {FAULT_SECONDS:.0f} s mid-stream "
                f"({write_failures(service)} write retries, {stalled} answered meanwhile)",
                rows,
                [service],
            )
        )
    assert stalled <= 2 * 4, "hardly anything is answered while no write can succeed"
    print(row)  # shown with -rA; the table is written by make test-faults
    assert row.lost == 0
    assert row.duplicates == 0
    assert (row.sent, row.replies, row.rows, row.parked) == (REQUESTS, REQUESTS, REQUESTS, 0)


async def test_sqlite_read_only_at_start_keeps_the_queue_and_catches_up(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    small_disk: SmallDisk,
    fault_table: FaultTable,
) -> None:
    """A running service holds the file open for writing, so the mount cannot turn read-only
    under it (EBUSY): the read-only case is a restart onto a read-only database."""
    database_url = f"sqlite+aiosqlite:///{small_disk.path / 'deployflag.db'}"
    env = {**service_env, "DEPLOYFLAG_DATABASE_URL": database_url, "DEPLOYFLAG_WORKERS": "2"}
    first = start_service(env)
    async with Tally(rabbit_url, names) as tally:
        for i in range(20):
            await tally.publish(WORKED, message_id=f"req-{i:03d}")
        await tally.settle(timeout=60)
        assert first.stop() == 0
        for i in range(20, REQUESTS):
            await tally.publish(WORKED, message_id=f"req-{i:03d}")
        await asyncio.to_thread(small_disk.read_only, True)
        try:
            # The service waits for a database it cannot write to like for one that is down:
            # bound the wait so the start gives up (exit 75) while the queue is watched.
            refused = start_service(
                {**env, "DEPLOYFLAG_DATABASE_CONNECT_TIMEOUT": "3"}, ready=False
            )
            code = await asyncio.to_thread(refused.wait, 90)
            error = [line for line in refused.log().splitlines() if line.startswith("deployflag:")]
            ready, _ = await queue_counts(rabbit_url, names.queue("training"))
        finally:
            await asyncio.to_thread(small_disk.read_only, False)
        again = start_service(env)
        await tally.settle(timeout=180)
        rows = await metadata_ids(database_url)
        row = fault_table.add(
            tally.row(
                f"SQLite read-only at start: exit {code}, {ready} requests kept queued, "
                "then served once writable",
                rows,
                [first, refused, again],
            )
        )
    assert code != 0, "a read-only database is not served"
    assert len(error) == 1, refused.log()
    assert ready == REQUESTS - 20, "nothing was taken from the queue meanwhile"
    print(row)  # shown with -rA; the table is written by make test-faults
    assert row.lost == 0
    assert row.duplicates == 0
    assert (row.sent, row.replies, row.rows, row.parked) == (REQUESTS, REQUESTS, REQUESTS, 0)
