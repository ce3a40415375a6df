"""Helpers for the metadata-store tests: one fresh database per test, on SQLite and PostgreSQL.

Import the ``database`` fixture into a test module to run its tests on both backends; the
PostgreSQL case carries the ``postgres`` marker and uses the session's throwaway cluster.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any, Literal

import pytest

from deployflag.messages import ModelReport, Score, TrainingResult
from deployflag.settings import Settings, load_settings
from deployflag.store import Store

FINISHED_AT = datetime(2021, 3, 4, 10, 11, 12, 123456, tzinfo=UTC)


@dataclass(frozen=True)
class Database:
    kind: Literal["sqlite", "postgres"]
    url: str
    data_dir: Path

    def settings(self, **overrides: Any) -> Settings:
        return load_settings(database_url=self.url, data_dir=self.data_dir, **overrides)


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]
)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """An empty database: a SQLite file in a directory that does not exist yet, or a new PG db."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'deployflag.db'}"
        return Database("sqlite", url, tmp_path / "data")
    cluster = request.getfixturevalue("postgres")
    url = cluster.fresh_database(f"t_{uuid.uuid4().hex[:16]}")
    return Database("postgres", url, tmp_path / "data")


def make_result(
    request_id: str,
    repo_id: int | str = 12860,
    *,
    roc_auc: float | None = 0.75,
    precision: float | None = 0.5,
    estimator: str = "HistGradientBoostingClassifier",
) -> TrainingResult:
    return TrainingResult(
        request_id=request_id,
        repo_id=repo_id,
        scores=[
            Score(
                issue_shortcode="PYL-W0611",
                issue_weight=41,
                fix_probability=0.0,
                daily_weighted_fix_rate=0.5714,
                historical_weighted_fix_rate=0.4,
                severity_score=60,
            )
        ],
        model=ModelReport(
            trained=roc_auc is not None,
            estimator=estimator,
            parameters={"max_depth": 3},
            roc_auc=roc_auc,
            precision=precision,
            training_rows=120,
            training_seconds=0.42,
        ),
        deployflag_version="2.0.0",
        finished_at=FINISHED_AT,
    )


# --- load from other processes (multiprocessing "spawn": a fresh interpreter, its own loop) ----


def record_many(
    url: str, prefix: str, count: int, barrier: Barrier, results: Queue[tuple[str, list[str]]]
) -> None:
    """Open the store (migrating if needed) and record ``count`` results at once, in step with
    the sibling process."""
    outcomes = asyncio.run(_record_many(url, prefix, count, barrier))
    results.put((prefix, outcomes))


async def _record_many(url: str, prefix: str, count: int, barrier: Barrier) -> list[str]:
    settings = load_settings(database_url=url, auto_migrate=True)
    barrier.wait(60)  # both processes open (and migrate) together
    store = await Store.open(settings)
    try:
        barrier.wait(60)  # … and then record together
        config = settings.pipeline_config()
        done = await asyncio.gather(
            *(store.record_result(make_result(f"{prefix}-{i}"), config) for i in range(count)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    return [repr(item) if isinstance(item, BaseException) else str(item[0]) for item in done]
