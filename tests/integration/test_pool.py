"""The worker pool with real processes: time limits, crashes, and the workers beside them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deployflag.pool import JobTimeLimit, WorkerCrashed, WorkerPool
from deployflag.settings import Settings
from tests.support.toolkit import async_wait_until


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[WorkerPool]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
        workers=2,
        worker_memory_limit=0,
        log_format="json",
    )
    causes: list[str] = []
    pool = WorkerPool(settings, on_rebuild=causes.append)
    await pool.start()
    pool.causes = causes  # type: ignore[attr-defined]
    try:
        yield pool
    finally:
        await pool.close()


async def test_a_job_past_its_time_limit_is_killed_and_its_neighbour_runs_on(
    pool: WorkerPool,
) -> None:
    # Two jobs side by side; the slow one runs past its limit: only its worker is killed.
    slow = asyncio.create_task(pool.run(time.sleep, 30, time_limit=1))
    beside = asyncio.create_task(pool.run(sleep_then_pid, 2.0, time_limit=60))
    with pytest.raises(JobTimeLimit):
        await slow
    beside_pid = await beside  # not interrupted
    assert pool.causes == ["time_limit"]  # type: ignore[attr-defined]
    # The untouched worker and the replacement both take jobs.
    pids = set(await asyncio.gather(*(pool.run(sleep_then_pid, 0.5, time_limit=60) for _ in "ab")))
    assert len(pids) == 2
    assert beside_pid in pids


async def test_a_worker_that_dies_fails_only_its_own_job(pool: WorkerPool) -> None:
    doomed = asyncio.create_task(pool.run(kill_self, time_limit=60))
    beside = asyncio.create_task(pool.run(time.sleep, 1, time_limit=60))
    with pytest.raises(WorkerCrashed):
        await doomed
    assert await beside is None
    assert pool.causes == ["crash"]  # type: ignore[attr-defined]
    # It was replaced: every job gets an answer.
    jobs = [pool.run(sum, [1, 2], time_limit=60) for _ in range(4)]
    assert await asyncio.gather(*jobs) == [3] * 4


async def test_the_job_s_own_exception_comes_back_as_it_was(pool: WorkerPool) -> None:
    with pytest.raises(ZeroDivisionError):
        await pool.run(divmod, 1, 0, time_limit=60)
    assert await pool.run(divmod, 7, 2, time_limit=60) == (3, 1)
    assert pool.causes == []  # type: ignore[attr-defined]


async def test_a_cancelled_caller_does_not_free_a_busy_worker(pool: WorkerPool) -> None:
    busy = [asyncio.create_task(pool.run(time.sleep, 1.5, time_limit=60)) for _ in range(2)]
    await async_wait_until(lambda: busy_workers(pool) == 2, 10, "both jobs handed out")
    busy[0].cancel()
    waiting = asyncio.create_task(pool.run(os.getpid, time_limit=60))
    # The cancelled job's worker is busy for 1.5 s more: the third job waits for it.
    done, _ = await asyncio.wait({waiting}, timeout=0.5)
    assert not done, "a job was sent to a worker still running a cancelled caller's job"
    assert isinstance(await waiting, int)
    assert await busy[1] is None


async def test_jobs_beyond_the_pool_size_wait_outside_the_time_limit(pool: WorkerPool) -> None:
    # Three jobs of 1.5 s on two workers: the third waits ~1.5 s for a worker, yet its 2.5 s
    # limit only counts while it runs.
    jobs = [pool.run(time.sleep, 1.5, time_limit=2.5) for _ in range(3)]
    assert await asyncio.gather(*jobs) == [None, None, None]
    assert pool.causes == []  # type: ignore[attr-defined]


def busy_workers(pool: WorkerPool) -> int:
    """Workers with a job handed to them and not answered yet."""
    return sum(1 for slot in pool._slots if slot.job is not None and not slot.job.done())


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def test_a_large_job_goes_through_the_pipe_whole(pool: WorkerPool) -> None:
    # Above the inline size the job is pickled and written from a thread, in pieces.
    body = bytes(range(256)) * 20_000  # 5 MB
    digest = await pool.run(sha256_hex, body, time_limit=60)
    assert digest == hashlib.sha256(body).hexdigest()


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def test_closing_fails_the_running_jobs_as_crashes(pool: WorkerPool) -> None:
    running = asyncio.create_task(pool.run(time.sleep, 30, time_limit=60))
    await async_wait_until(lambda: busy_workers(pool) == 1, 10, "the job handed out")
    await pool.close()
    with pytest.raises(WorkerCrashed):
        await asyncio.wait_for(running, 10)
    assert pool.causes == [], "stopping is not a replacement"  # type: ignore[attr-defined]
    with pytest.raises(WorkerCrashed, match="not running"):
        await pool.run(os.getpid, time_limit=60)
