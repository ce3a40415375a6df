"""Service.close() and the pool's health report, without processes or a broker."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployflag.pool import WorkerPool
from deployflag.service import Service
from deployflag.settings import load_settings


class Part:
    def __init__(self, name: str, closed: list[str], fail: bool) -> None:
        self.name, self.closed, self.fail = name, closed, fail

    async def close(self) -> None:
        self.closed.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} would not close")


@pytest.mark.parametrize("failing", ["connection", "pool", "store"])
async def test_close_closes_every_part_even_when_one_fails(failing: str) -> None:
    service = Service(load_settings())
    closed: list[str] = []
    parts: dict[str, Any] = {
        name: Part(name, closed, name == failing) for name in ("connection", "pool", "store")
    }
    service._connection, service._pool, service._store = (  # type: ignore[assignment]
        parts["connection"],
        parts["pool"],
        parts["store"],
    )
    await service.close()
    assert closed == ["connection", "pool", "store"]


async def test_a_pool_whose_replacement_did_not_start_reports_itself_unhealthy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports: list[bool] = []
    pool = WorkerPool(load_settings(workers=2), on_health=reports.append)
    start_fails = asyncio.Event()

    async def start_worker(slot: Any) -> None:  # no worker processes in a unit test
        if start_fails.is_set():
            raise TimeoutError
        slot.alive = True

    monkeypatch.setattr(pool, "_start_worker", start_worker)
    await pool.start()
    assert reports == [True]
    first = pool._slots[0]
    start_fails.set()
    await pool._replace(first, "crash")
    assert reports == [True, False], "readiness must see the worker that did not come back"
    assert not first.alive
    start_fails.clear()
    await pool._replace(first, "crash")
    assert reports == [True, False, True]
    await pool.close()
    assert reports == [True, False, True, False]
