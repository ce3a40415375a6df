"""Group commit in the SQLite writer thread: the transactions queued at once share one commit,
each in a savepoint, so one that fails leaves its neighbours committed, and the rows come out as
they would one transaction at a time."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection

from deployflag.errors import TransientError
from deployflag.pipeline.config import PipelineConfig
from deployflag.settings import load_settings
from deployflag.store import Claim, Store
from deployflag.store.writer import GroupWriter
from tests.support.store import make_result
from tests.support.toolkit import async_wait_until

CONFIG = PipelineConfig(scoring="seed")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'deployflag.db'}"
    opened = await Store.open(load_settings(database_url=url, data_dir=tmp_path / "data"))
    try:
        yield opened
    finally:
        await opened.close()


def writer_of(store: Store) -> GroupWriter:
    writer = store._writer
    assert writer is not None
    return writer


class Held:
    """Keeps the writer thread busy in a transaction of its own until released, so that the
    transactions submitted meanwhile queue up and are taken as one batch."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.entered = threading.Event()
        self.release = threading.Event()
        self.task: asyncio.Task[None] | None = None

    def _body(self, _conn: Connection) -> None:
        self.entered.set()
        assert self.release.wait(30), "the test never released the writer"

    async def __aenter__(self) -> Held:
        self.task = asyncio.ensure_future(self._store._write(self._body))
        try:
            await async_wait_until(self.entered.is_set, 10, "the writer to take the transaction")
        except BaseException:
            self.release.set()
            raise
        await async_wait_until(self.entered.is_set, 10, "the writer to take the held transaction")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.task is not None
        await self.task


async def queued(store: Store, count: int) -> None:
    """Wait until ``count`` transactions have been handed to the writer (they queue behind Held)."""
    writer = writer_of(store)
    await async_wait_until(lambda: writer._queue.qsize() >= count, 10, f"{count} queued")


def failing_claim(request_id: str) -> Callable[[Connection], Any]:
    """Writes a row, then fails: its savepoint must take the row back with it."""

    def body(conn: Connection) -> Any:
        conn.execute(
            text(
                "INSERT INTO training_request (request_id, status, attempts, received_at, "
                "updated_at) VALUES (:rid, 'pending', 1, '2021-01-01', '2021-01-01')"
            ),
            {"rid": request_id},
        )
        raise RuntimeError("this transaction fails after writing")

    return body


async def test_one_failing_transaction_does_not_fail_its_batch(store: Store) -> None:
    writer = writer_of(store)
    async with Held(store):
        before = (writer.batches, writer.transactions)
        first = asyncio.ensure_future(store.claim("a", 1))
        await queued(store, 1)
        broken = asyncio.ensure_future(store._write(failing_claim("victim")))
        await queued(store, 2)
        second = asyncio.ensure_future(store.record_result(make_result("b", 2), CONFIG))
        await queued(store, 3)
        third = asyncio.ensure_future(store.claim("c", 3))
        await queued(store, 4)
    outcomes = await asyncio.gather(first, broken, second, third, return_exceptions=True)
    # The held transaction was one batch, the four queued behind it the next.
    assert (writer.batches - before[0], writer.transactions - before[1]) == (2, 5)
    assert outcomes[0] == Claim(status="pending", attempts=1)
    assert isinstance(outcomes[1], RuntimeError)
    assert outcomes[2] == (True, make_result("b", 2).model_dump(mode="json"))
    assert outcomes[3] == Claim(status="pending", attempts=1)
    assert await store.get_request("victim") is None  # rolled back to its savepoint
    for rid, status in (("a", "pending"), ("b", "done"), ("c", "pending")):
        row = await store.get_request(rid)
        assert row is not None
        assert row["status"] == status


async def test_a_batch_gives_the_same_results_as_one_at_a_time(tmp_path: Path) -> None:
    """The same operations, batched and one by one, answer and leave the rows alike."""

    async def operations(store: Store, batched: bool) -> tuple[list[Any], list[Any]]:
        calls = [
            lambda: store.claim("x", 1),
            lambda: store.claim("x", 1),
            lambda: store.record_result(make_result("y", 2), CONFIG),
            lambda: store.claim("y", 2),  # done already, within the same batch
            lambda: store.record_failure("z", 3, "bad_data", "no"),
            lambda: store.claim("z", 3),  # a re-drive of a parked request
        ]
        if batched:
            async with Held(store):
                tasks = []
                for i, call in enumerate(calls):
                    tasks.append(asyncio.ensure_future(call()))
                    await queued(store, i + 1)
            answers = list(await asyncio.gather(*tasks))
        else:
            answers = [await call() for call in calls]
        rows = []
        for rid in ("x", "y", "z"):
            row = await store.get_request(rid)
            assert row is not None
            rows.append((row["status"], row["attempts"], row["result"], row["reason"]))
        return answers, rows

    results = []
    for batched in (False, True):
        directory = tmp_path / ("batched" if batched else "serial")
        url = f"sqlite+aiosqlite:///{directory / 'deployflag.db'}"
        store = await Store.open(load_settings(database_url=url, data_dir=directory))
        try:
            results.append(await operations(store, batched))
        finally:
            await store.close()
    assert results[0] == results[1]
    answers, rows = results[1]
    assert [a.attempts for a in answers if isinstance(a, Claim)] == [1, 2, 1, 1]
    assert rows[2][0] == "pending"


async def test_a_lost_transaction_fails_the_whole_batch(store: Store) -> None:
    """When SQLite ends the shared transaction itself, nothing done before in the batch may be
    reported as committed."""

    def loses_the_transaction(conn: Connection) -> None:
        conn.exec_driver_sql("ROLLBACK")  # what SQLite does on a full disk or an I/O error
        raise RuntimeError("disk I/O error")

    async with Held(store):
        first = asyncio.ensure_future(store.claim("before", 1))
        await queued(store, 1)
        lost = asyncio.ensure_future(store._write(loses_the_transaction))
        await queued(store, 2)
        behind = asyncio.ensure_future(store.claim("behind", 1))  # never runs in that batch
        await queued(store, 3)
    outcomes = await asyncio.wait_for(
        asyncio.gather(first, lost, behind, return_exceptions=True), timeout=10
    )
    assert isinstance(outcomes[1], Exception)  # its own error, or the rollback's
    assert isinstance(outcomes[0], TransientError), outcomes[0]
    assert isinstance(outcomes[2], TransientError), outcomes[2]
    assert await store.get_request("before") is None
    assert await store.get_request("behind") is None
    # The writer goes on with the next transaction.
    assert await store.claim("after", 1) == Claim(status="pending", attempts=1)


async def test_claim_and_record_counts_the_attempt_and_records_in_one_write(store: Store) -> None:
    writer = writer_of(store)
    before = writer.transactions
    folded = await store.claim_and_record(make_result("f1", 1), CONFIG, "digest-1", 3)
    assert writer.transactions - before == 1
    assert folded.claim == Claim(status="pending", attempts=1)
    assert folded.recorded
    assert folded.stored == make_result("f1", 1).model_dump(mode="json")
    row = await store.get_request("f1")
    assert row is not None
    assert (row["status"], row["attempts"], row["body_digest"]) == ("done", 1, "digest-1")
    # Once done, a second copy is answered from the row and records nothing.
    again = await store.claim_and_record(make_result("f1", 1), CONFIG, "digest-1", 3)
    assert again.claim.status == "done"
    assert again.claim.result == folded.stored
    assert not again.recorded
    # Another body under the same id is a conflict, and the row is left alone.
    other = await store.claim_and_record(make_result("f1", 1), CONFIG, "digest-2", 3)
    assert other.claim.status == "conflict"


async def test_claim_and_record_out_of_attempts_counts_it_and_records_nothing(store: Store) -> None:
    for _ in range(3):
        await store.claim("f2", 1)
    folded = await store.claim_and_record(make_result("f2", 1), CONFIG, None, 3)
    assert folded.claim == Claim(status="pending", attempts=4)
    assert not folded.recorded
    row = await store.get_request("f2")
    assert row is not None
    assert (row["status"], row["attempts"], row["result"]) == ("pending", 4, None)
