"""The worker pool with real processes: time limits, and the jobs caught in another's kill."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deployflag.pool import JobTimeLimit, WorkerCrashed, WorkerPool
from deployflag.settings import Settings


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


async def test_a_job_past_its_time_limit_is_killed_and_its_neighbour_not_blamed(
    pool: WorkerPool,
) -> None:
    # Two jobs running side by side; the slow one runs past its limit and the pool is killed.
    slow = asyncio.create_task(pool.run(time.sleep, 30, time_limit=1))
    neighbour = asyncio.create_task(pool.run(time.sleep, 10, time_limit=60))
    with pytest.raises(JobTimeLimit):
        await slow
    with pytest.raises(WorkerCrashed) as crashed:
        await neighbour
    assert crashed.value.collateral, "the neighbour was killed for someone else's time limit"
    assert pool.causes == ["time_limit"]  # type: ignore[attr-defined]
    # The rebuilt pool runs the next job.
    assert await pool.run(sum, [1, 2, 3], time_limit=60) == 6


async def test_jobs_beyond_the_pool_size_wait_outside_the_time_limit(pool: WorkerPool) -> None:
    # Three jobs of 1.5 s on two workers: the third waits ~1.5 s for a worker, yet its 2.5 s
    # limit only counts while it runs.
    jobs = [pool.run(time.sleep, 1.5, time_limit=2.5) for _ in range(3)]
    assert await asyncio.gather(*jobs) == [None, None, None]
    assert pool.causes == []  # type: ignore[attr-defined]
