"""The worker processes that do the CPU-bound work, each with a pipe of its own to the loop.

Every worker is a process forked from a forkserver, holding one end of a duplex pipe; the loop
holds the other and watches it with ``add_reader``. A job is pickled and written to an idle
worker's pipe, and its outcome read back when the pipe becomes readable: no helper threads, no
wake-up pipes, one write and one read per job. (``ProcessPoolExecutor`` hands each job to a
feeder thread and each result to a manager thread; on small requests those hand-offs cost more
of the service's CPU than the job itself.)

Owning each worker also makes failures precise: a worker that dies (SIGKILL, the OOM killer, a
segfault) closes its pipe, so exactly its own job fails with :class:`WorkerCrashed`; a job past
its time limit gets its worker killed, and nobody else's. Either way that one worker is
replaced before it takes another job. Jobs beyond the number of workers wait for an idle one,
outside their time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from deployflag import logs, worker
from deployflag.settings import Settings

T = TypeVar("T")
log = logs.get_logger("deployflag.pool")
WARM_UP_TIMEOUT = 120.0  # seconds for a new worker to start and import its libraries
# Jobs up to this size are written to the pipe from the loop: the worker is idle, so its pipe is
# empty and the write cannot block (a Linux pipe holds 64 KiB). Larger ones from a thread.
INLINE_SEND_BYTES = 48 * 1024
CRASHED = "a worker process died"


class WorkerCrashed(Exception):
    """The worker process running the job died; the job may be retried."""


class JobTimeLimit(Exception):
    """The job ran past the time limit; its worker was killed."""


class _Slot:
    """One worker: its process, the loop's end of its pipe, and the job it is running."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.job: asyncio.Future[tuple[bool, Any]] | None = None
        self.alive = False  # started, warmed, and its pipe open
        self.failed = False  # its last replacement did not start (readiness is false)


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        on_rebuild: Callable[[str], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_rebuild = on_rebuild  # told the cause each time a worker is replaced
        # Told False when a worker's replacement did not start and when the pool closes, True
        # once every worker is up again: readiness follows.
        self._on_health = on_health or (lambda _: None)
        self._healthy = False
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self._idle: asyncio.Queue[_Slot] = asyncio.Queue()
        self._closed = False
        worker.cap_threads()  # inherited by the forkserver and every worker it forks
        # forkserver: workers are forked from a clean server process that never ran an event
        # loop, with numpy and scikit-learn already imported there (fast replacements).
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["deployflag.worker", "deployflag.pipeline.model"])

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each has imported its libraries."""
        try:
            await asyncio.gather(*(self._start_worker(slot) for slot in self._slots))
        except BaseException:
            await self.close()
            raise
        for slot in self._slots:
            self._idle.put_nowait(slot)
        self._set_health(True)

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(self._stop_worker(slot) for slot in self._slots))
        self._set_health(False)

    def _set_health(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            self._on_health(ok)

    async def _start_worker(self, slot: _Slot) -> None:
        """Start a worker for ``slot`` and wait for its first answer. Raises WorkerCrashed or
        TimeoutError when it does not come up."""
        s = self._settings
        initargs = (
            s.log_format,
            s.log_level,
            int(s.worker_memory_limit),
            os.getpid(),
            s.max_shortcodes,
        )
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker.serve,
            args=(theirs, initargs),
            name=f"deployflag-worker-{slot.index}",
            daemon=True,
        )
        try:
            # Starting talks to the forkserver (and starts it, the first time): not on the loop.
            await asyncio.to_thread(process.start)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker's end lives in the worker: its death closes the pipe
        slot.process, slot.conn, slot.job = process, ours, None
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, slot, ours)
        slot.alive = True
        ok, value = await self._exchange(slot, worker.ping, (), WARM_UP_TIMEOUT)
        if not ok:
            raise WorkerCrashed(f"the worker failed to start: {value}")

    async def _stop_worker(self, slot: _Slot) -> None:
        process, conn, job = slot.process, slot.conn, slot.job
        slot.alive, slot.process, slot.conn, slot.job = False, None, None, None
        if conn is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            conn.close()
        if job is not None and not job.done():  # its caller hears of it as of a crash
            job.set_exception(WorkerCrashed("the worker was stopped"))
        if process is not None:
            with contextlib.suppress(ValueError):  # never started
                if process.is_alive():
                    process.kill()
                await asyncio.to_thread(process.join, 5)
                process.close()

    async def _replace(self, slot: _Slot, cause: str) -> None:
        """Stop ``slot``'s worker and start another; readiness follows whether it started."""
        await self._stop_worker(slot)
        if self._closed:  # stopping: nothing to replace
            return
        log.warning("worker replaced", cause=cause, worker=slot.index)
        if self._on_rebuild is not None:
            self._on_rebuild(cause)
        try:
            await self._start_worker(slot)
        except (WorkerCrashed, TimeoutError, OSError) as exc:
            # Readiness goes false; the next job to take this slot tries again.
            log.warning("replacement worker did not start", error=str(exc) or type(exc).__name__)
            await self._stop_worker(slot)
            slot.failed = True
            self._set_health(False)
        else:
            slot.failed = False
            # A neighbour being replaced right now does not count: only one that failed to.
            self._set_health(not any(s.failed for s in self._slots))

    # --- jobs ---------------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, time_limit: float | None = None) -> T:
        """Run ``fn(*args)`` in a worker. Raises WorkerCrashed or JobTimeLimit on those events;
        the job's own exceptions pass through unchanged."""
        if self._closed:
            raise WorkerCrashed("the pool is not running")
        slot = await self._idle.get()
        try:
            if not slot.alive:  # died while idle, or its replacement did not start
                await self._replace(slot, "crash")
                if not slot.alive:
                    raise WorkerCrashed("no worker could be started")
            ok, value = await self._call(slot, fn, args, time_limit)
        finally:
            self._release(slot)
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def _release(self, slot: _Slot) -> None:
        """Back to the idle workers once its job is over, even when the caller stopped waiting
        (a cancelled caller must not free a worker that is still busy)."""
        job = slot.job
        if job is None or job.done():
            self._idle.put_nowait(slot)
        else:
            job.add_done_callback(lambda _: self._idle.put_nowait(slot))

    async def _call(
        self, slot: _Slot, fn: Callable[..., Any], args: tuple[Any, ...], time_limit: float | None
    ) -> tuple[bool, Any]:
        """:meth:`_exchange`, replacing the worker when it died or ran out of time."""
        try:
            return await self._exchange(slot, fn, args, time_limit)
        except TimeoutError:
            await self._replace(slot, "time_limit")
            raise JobTimeLimit(f"ran past the {time_limit:g} s time limit") from None
        except WorkerCrashed:
            await self._replace(slot, "crash")
            raise

    async def _exchange(
        self, slot: _Slot, fn: Callable[..., Any], args: tuple[Any, ...], time_limit: float | None
    ) -> tuple[bool, Any]:
        """Send one job to ``slot``'s idle worker and wait for its outcome: (ok, the value or
        the exception it raised). WorkerCrashed when the worker died, TimeoutError past
        ``time_limit`` (the worker is then still busy: the caller replaces it)."""
        conn = slot.conn
        assert conn is not None
        job: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        job.add_done_callback(_retrieved)  # its caller may have stopped waiting
        slot.job = job
        try:
            if _carried_bytes(args) <= INLINE_SEND_BYTES:
                data = _pickled(fn, args)
                if len(data) <= INLINE_SEND_BYTES:
                    conn.send_bytes(data)
                else:
                    await asyncio.to_thread(conn.send_bytes, data)
            else:  # a large body: pickled (a copy of it) and written off the loop
                await asyncio.to_thread(lambda: conn.send_bytes(_pickled(fn, args)))
        except OSError:  # its end is closed: the worker is gone
            if not job.done():
                job.set_exception(WorkerCrashed(CRASHED))
        try:
            return await asyncio.wait_for(asyncio.shield(job), time_limit)
        except TimeoutError:
            job.cancel()
            raise

    def _readable(self, slot: _Slot, conn: Connection) -> None:
        """The loop's reader on a worker's pipe: its job's outcome, or its end (EOF)."""
        job = slot.job if slot.conn is conn else None
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(conn.fileno())
            if slot.conn is conn:
                slot.alive = False
            if job is not None and not job.done():
                job.set_exception(WorkerCrashed(CRASHED))
            return
        try:
            outcome = pickle.loads(data)  # our own worker's reply, never a message's bytes
        except Exception as exc:  # a class the loop cannot import, say: the job's failure
            outcome = (False, exc)
        if job is not None and not job.done():
            job.set_result(outcome)


def _pickled(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    return pickle.dumps((fn, args), pickle.HIGHEST_PROTOCOL)


def _carried_bytes(args: tuple[Any, ...]) -> int:
    """The bytes a job carries (a message body, bare or in a :class:`worker.Job`): pickling
    copies them, so a large one is pickled off the loop."""
    total = 0
    for arg in args:
        body = getattr(arg, "body", arg)
        if isinstance(body, bytes | bytearray | memoryview):
            total += len(body)
    return total


def _retrieved(job: asyncio.Future[Any]) -> None:
    if not job.cancelled():
        job.exception()  # marks it retrieved: no "exception was never retrieved" log


async def discard(job: asyncio.Future[Any] | None) -> None:
    """Let a job nobody needs finish, whatever its outcome: it is small, and its worker stays
    busy with it anyway."""
    if job is not None:
        with contextlib.suppress(Exception):
            await job


def abandon(job: asyncio.Future[Any]) -> None:
    """Cancel a job nobody will await, and keep its outcome out of the "never retrieved" log."""
    job.cancel()
    job.add_done_callback(lambda done: done.cancelled() or done.exception())
