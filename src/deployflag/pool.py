"""The process pool that does the CPU-bound work, and what to do when a worker dies.

A ProcessPoolExecutor whose worker dies (SIGKILL, the OOM killer, a segfault) is broken for good:
every pending future fails with BrokenProcessPool. This wrapper rebuilds it once per breakage,
kills it on purpose when a job runs past the time limit, and tells the caller which of the two
happened so the attempt can be counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from deployflag import logs, worker
from deployflag.settings import Settings

T = TypeVar("T")
log = logs.get_logger("deployflag.pool")
WARM_UP_TIMEOUT = 120.0  # seconds for every worker of a new pool to start and import


class WorkerCrashed(Exception):
    """The worker process running the job died, or the pool broke under it; retry the job.

    ``collateral`` is true when the pool was killed because another job ran past the time
    limit: this job did nothing wrong, and its attempt should not count.
    """

    def __init__(self, message: str, *, collateral: bool = False) -> None:
        super().__init__(message)
        self.collateral = collateral


class JobTimeLimit(Exception):
    """The job ran past the time limit; its worker was killed."""


class WorkerPool:
    def __init__(
        self,
        settings: Settings,
        on_rebuild: Callable[[str], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_rebuild = on_rebuild
        # Told False while a broken pool is replaced and when its replacement did not start,
        # True once a pool has started (or a job has succeeded on it): readiness follows.
        self._on_health = on_health or (lambda _: None)
        self._healthy = False
        self._executor: ProcessPoolExecutor | None = None
        self._generation = 0
        self._causes: dict[int, str] = {}  # generation → why it was replaced
        self._lock = asyncio.Lock()
        # One job per worker is handed to the executor; the rest wait here. So a job's time
        # limit runs while it runs, not while it waits behind others in the executor's queue,
        # and killing the pool for one job's time limit interrupts only jobs that were running.
        self._slots = asyncio.Semaphore(settings.workers)
        worker.cap_threads()  # inherited by the forkserver and every worker it forks
        # forkserver: workers are forked from a clean server process that never ran an event
        # loop, with numpy and scikit-learn already imported there (fast rebuilds).
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["deployflag.worker", "deployflag.pipeline.model"])

    def _new_executor(self) -> ProcessPoolExecutor:
        s = self._settings
        return ProcessPoolExecutor(
            max_workers=s.workers,
            mp_context=self._context,
            initializer=worker.init_worker,
            initargs=(
                s.log_format,
                s.log_level,
                int(s.worker_memory_limit),
                os.getpid(),
                s.max_shortcodes,
            ),
        )

    async def start(self) -> None:
        """Create the executor and wait until every worker has imported its libraries."""
        executor = self._new_executor()
        try:
            await self._warm(executor)
        except BaseException:
            await asyncio.to_thread(_kill, executor)
            raise
        self._executor = executor
        self._set_health(True)

    def _set_health(self, ok: bool) -> None:
        if ok != self._healthy:
            self._healthy = ok
            self._on_health(ok)

    async def _warm(self, executor: ProcessPoolExecutor) -> None:
        """Start every worker now, so that no job's time limit pays for a worker's start."""
        loop = asyncio.get_running_loop()
        pings = [loop.run_in_executor(executor, worker.ping) for _ in range(self._settings.workers)]
        await asyncio.wait_for(asyncio.gather(*pings), WARM_UP_TIMEOUT)

    async def run(self, fn: Callable[..., T], *args: Any, time_limit: float | None = None) -> T:
        """Run ``fn(*args)`` in a worker. Raises WorkerCrashed or JobTimeLimit on those events;
        the job's own exceptions pass through unchanged."""
        async with self._slots:
            return await self._run(fn, *args, time_limit=time_limit)

    async def _run(self, fn: Callable[..., T], *args: Any, time_limit: float | None) -> T:
        if self._executor is None:
            async with self._lock:  # a rebuild is under way: wait for the new pool
                pass
        executor = self._executor
        if executor is None:
            raise WorkerCrashed("the pool is not running")
        generation = self._generation
        try:
            future = executor.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError) as exc:
            await self._rebuild(generation, "crash")
            raise WorkerCrashed(str(exc) or "the pool is broken") from None
        try:
            value = await asyncio.wait_for(asyncio.wrap_future(future), time_limit)
        except TimeoutError:
            await self._rebuild(generation, "time_limit")
            raise JobTimeLimit(f"ran past the {time_limit:g} s time limit") from None
        except BrokenProcessPool as exc:
            # Killed for another job's time limit (that job rebuilt the pool already), or a
            # worker died: then nobody can tell whose job killed it, so every job counts it.
            collateral = self._causes.get(generation) == "time_limit"
            await self._rebuild(generation, "crash")
            raise WorkerCrashed(
                str(exc) or "a worker process died", collateral=collateral
            ) from None
        self._set_health(True)  # a replacement that was slow to start has come up after all
        return value

    async def _rebuild(self, generation: int, cause: str) -> None:
        """Replace the executor once per breakage, however many jobs noticed it."""
        async with self._lock:
            if generation != self._generation or self._executor is None:
                return
            old, self._executor = self._executor, None
            self._set_health(False)
            self._causes[generation] = cause
            self._generation += 1
            log.warning("pool rebuild", cause=cause, generation=self._generation)
            await asyncio.to_thread(_kill, old)
            if self._on_rebuild is not None:
                self._on_rebuild(cause)
            executor = self._new_executor()
            try:
                await self._warm(executor)
            except (BrokenProcessPool, TimeoutError) as exc:
                # Readiness stays false; the next job finds out, and rebuilds again.
                log.warning("rebuilt pool did not start", error=str(exc) or type(exc).__name__)
            else:
                self._set_health(True)
            self._executor = executor

    async def close(self) -> None:
        if self._executor is not None:
            await asyncio.to_thread(_kill, self._executor)
            self._executor = None
        self._set_health(False)


async def discard(job: asyncio.Future[Any] | None) -> None:
    """Let a job nobody needs finish, whatever its outcome: it is small, and cancelling it
    would free its pool slot while its worker is still busy with it."""
    if job is not None:
        with contextlib.suppress(Exception):
            await job


def abandon(job: asyncio.Future[Any]) -> None:
    """Cancel a job nobody will await, and keep its outcome out of the "never retrieved" log."""
    job.cancel()
    job.add_done_callback(lambda done: done.cancelled() or done.exception())


def _kill(executor: ProcessPoolExecutor) -> None:
    # The executor has no public way to stop a running job (3.14 adds kill_workers()).
    processes = dict(getattr(executor, "_processes", None) or {})
    for process in processes.values():
        if process.is_alive():
            process.kill()
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes.values():
        process.join(timeout=5)
