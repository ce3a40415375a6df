"""The SQLite writer thread, with group commit.

SQLite has one writer at a time, and every commit pays a write of the WAL (and its fsync). So the
store's write transactions run here, in one thread, with the synchronous driver: each one whole,
one hand-off between the event loop and the thread. Every transaction waiting when the thread
gets to work shares one ``BEGIN IMMEDIATE … COMMIT``, each inside a ``SAVEPOINT`` of its own:

- a transaction that raises rolls back to its savepoint and fails alone; its neighbours go on;
- each caller learns its outcome only after the shared ``COMMIT``: a value is never returned
  for work that might still be rolled back;
- when the ``BEGIN`` or the ``COMMIT`` fails (the database is locked past the busy timeout, the
  disk is full, the file went away), nothing of the batch is committed and every transaction
  that had not already failed on its own gets that error.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from deployflag.store.prepared import execute

T = TypeVar("T")
MAX_BATCH = 64  # transactions per commit: bounds how long the write lock is held at once


class WriterClosed(RuntimeError):
    """The store was closed; no transaction is taken any more."""


class TransactionLost(sa_exc.OperationalError):
    """SQLite ended the shared transaction itself after one of its statements failed (a full
    disk, an I/O error): to every transaction of the batch, the database is unavailable."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(None, None, cause)


def _in_transaction(conn: Connection) -> bool:
    dbapi = conn.connection.dbapi_connection
    return bool(getattr(dbapi, "in_transaction", True))


class Pending(Generic[T]):
    """One submitted transaction and the future its caller awaits."""

    def __init__(self, body: Callable[[Connection], T], loop: asyncio.AbstractEventLoop) -> None:
        self.body = body
        self.future: asyncio.Future[T] = loop.create_future()
        self._loop = loop

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        # RuntimeError: the caller's loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._set, value, error)

    def _set(self, value: Any, error: BaseException | None) -> None:
        if self.future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(value)


class GroupWriter:
    """One thread of its own on ``engine`` (a synchronous engine with one connection)."""

    def __init__(self, engine: Engine, *, max_batch: int = MAX_BATCH) -> None:
        self._engine = engine
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Pending[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._serve, name="deployflag-sqlite", daemon=True)
        self._thread.start()
        self.batches = 0  # commits, and the transactions in them: for tests and benchmarks
        self.transactions = 0

    def submit(self, body: Callable[[Connection], T]) -> Pending[T]:
        if self._closed:
            raise WriterClosed("the store is closed")
        pending = Pending(body, asyncio.get_running_loop())
        self._queue.put(pending)
        return pending

    async def run(self, body: Callable[[Connection], T]) -> T:
        return await self.submit(body).future

    async def close(self) -> None:
        """Finish what was submitted, dispose of the engine, end the thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(batch)
        finally:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._conn.close()
            self._engine.dispose()

    def _connection(self) -> Connection:
        # Kept open between batches: a checkout per batch costs a pool round trip and the
        # pool's rollback on return, for nothing (this thread is the connection's only user).
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        """After a failed batch: the next one starts on a fresh connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _commit(self, started: list[Pending[Any]]) -> None:
        done: list[tuple[Pending[Any], Any]] = []
        failed: set[int] = set()  # ids of those that failed on their own (and were told)
        try:
            conn = self._connection()
            with conn.begin():  # BEGIN IMMEDIATE (store/engine.py) … COMMIT
                for pending in started:
                    # Savepoints on the driver connection: SQLAlchemy's nested transactions
                    # cost more than the statements of a small request.
                    execute(conn, "SAVEPOINT deployflag_tx")
                    try:
                        value = pending.body(conn)
                    except Exception as exc:
                        pending.settle(error=exc)
                        failed.add(id(pending))
                        if not _in_transaction(conn):
                            # SQLite rolled back the whole transaction (disk full, I/O error):
                            # the work done so far is lost, and COMMIT would not say so.
                            raise TransactionLost(exc) from exc
                        execute(conn, "ROLLBACK TO deployflag_tx")  # it fails alone
                    else:
                        done.append((pending, value))
                    execute(conn, "RELEASE deployflag_tx")
        except Exception as exc:  # nothing of the batch is committed: the done, the not yet run
            self._drop_connection()
            for pending in started:
                if id(pending) not in failed:
                    pending.settle(error=exc)
            return
        finally:
            self.batches += 1
            self.transactions += len(started)
        for pending, value in done:
            pending.settle(value)
