"""The handful of queries the service needs (SPEC §6, §7), each one transaction, each race-free.

Every write is a single upsert (``INSERT … ON CONFLICT``) rather than read-then-write, so any
number of processes on any number of machines can run them at once. Both SQLite (≥ 3.35) and
PostgreSQL speak that dialect; only the import of ``insert`` differs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from types import TracebackType
from typing import Any, Literal, Self

from sqlalchemy import Table, case, func, select, text
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from deployflag.errors import FatalError
from deployflag.exitcodes import RET_CONFIG
from deployflag.messages import TrainingResult
from deployflag.pipeline.config import PipelineConfig
from deployflag.redaction import redact
from deployflag.settings import Settings
from deployflag.store import migrate
from deployflag.store.engine import create_engine
from deployflag.store.failures import Target, guard
from deployflag.store.tables import (
    REASON_LENGTH,
    GridSearchParameter,
    ModelFramework,
    ModelPerformanceMetadata,
    TrainingRequest,
    utcnow,
)

MAX_ERROR_LENGTH = 10_000

_requests: Table = TrainingRequest.__table__  # type: ignore[assignment]
_frameworks: Table = ModelFramework.__table__  # type: ignore[assignment]
_grids: Table = GridSearchParameter.__table__  # type: ignore[assignment]
_metadata: Table = ModelPerformanceMetadata.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` found: work to do (``pending``) or a stored result (``done``)."""

    status: Literal["pending", "done"]
    attempts: int
    result: dict[str, Any] | None = None


@cache
def sklearn_version() -> str:
    """scikit-learn's version, read from its metadata: the store never imports scikit-learn."""
    try:
        return importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _text_id(repo_id: str | int | None) -> str | None:
    return None if repo_id is None else str(repo_id)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class Store:
    """The metadata database. Build it with :meth:`open`; every method is one transaction.

    Database trouble surfaces as :class:`TransientError` (retry later: the pool replaces dead
    connections by itself) or :class:`FatalError` (wrong credentials or schema).
    """

    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self._target = Target.from_url(engine.url)
        # SQLite has one writer at a time. Queue this process's writers here, where waiting is
        # free, rather than in SQLite's busy handler, which polls with sleeps of up to 100 ms.
        self._writers: AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if engine.dialect.name == "sqlite" else nullcontext()
        )

    @classmethod
    async def open(cls, settings: Settings) -> Store:
        """Connect, then bring the schema to head (SQLite, or ``auto_migrate``) or insist on it."""
        store = cls(create_engine(settings), settings)
        try:
            await store.ping()
            await store._ensure_schema()
        except BaseException:
            await store.close()
            raise
        return store

    async def _ensure_schema(self) -> None:
        want = migrate.head(self._settings)
        have = await migrate.current_revision(self._engine)
        if have == want:
            return
        if self._settings.is_sqlite or self._settings.auto_migrate:
            await migrate.upgrade_engine(self._engine, self._settings)
            return
        if have is not None and have not in migrate.known_revisions(self._settings):
            raise FatalError(
                f"database schema is at {have}, which this build does not know "
                f"(its newest is {want}): was it migrated by a newer deployflag?",
                exit_code=RET_CONFIG,
            )
        raise FatalError(
            f"database schema is at {have or 'no revision (empty database)'}, this build needs "
            f"{want}: run `python -m deployflag migrate`",
            exit_code=RET_CONFIG,
        )

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def ping(self) -> None:
        """Raise :class:`TransientError` unless the database answers."""
        async with guard(self._target), self._engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction, committed on exit; database trouble mapped to our errors."""
        async with self._writers, guard(self._target), self._engine.begin() as conn:
            yield conn

    def _insert(self, table: Table) -> PgInsert | SqliteInsert:
        if self._engine.dialect.name == "postgresql":
            return pg_insert(table)
        return sqlite_insert(table)

    # --- requests ------------------------------------------------------------------------

    async def claim(self, request_id: str, repo_id: str | int | None) -> Claim:
        """Start (or restart) work on a request, counting the attempt.

        New → pending, attempts 1; pending → attempts + 1; parked → pending again with attempts 1
        (a re-drive from the failed queue); done → unchanged, with its stored result.
        """
        t = _requests
        now = utcnow()
        insert = self._insert(t).values(
            request_id=request_id,
            repo_id=_text_id(repo_id),
            status="pending",
            attempts=1,
            received_at=now,
            updated_at=now,
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[t.c.request_id],
            set_={
                "status": "pending",
                "attempts": case((t.c.status == "parked", 1), else_=t.c.attempts + 1),
                "reason": None,
                "error": None,
                "finished_at": None,
                "repo_id": func.coalesce(insert.excluded.repo_id, t.c.repo_id),
                "updated_at": now,
            },
            where=t.c.status != "done",
        ).returning(t.c.attempts)
        async with self._transaction() as conn:
            attempts = (await conn.execute(upsert)).scalar_one_or_none()
            if attempts is not None:
                return Claim(status="pending", attempts=attempts)
            # Nothing was written, so the row is done: a final state, safe to read afterwards.
            row = (
                await conn.execute(
                    select(t.c.attempts, t.c.result).where(t.c.request_id == request_id)
                )
            ).one()
            return Claim(status="done", attempts=row.attempts, result=row.result)

    async def record_result(
        self, result: TrainingResult, config: PipelineConfig
    ) -> tuple[bool, dict[str, Any]]:
        """Mark the request done and write its metadata row, in one transaction.

        Returns ``(True, result_json)`` when this call finished the request, or
        ``(False, stored_result)`` when it was already done (nothing else is written then).
        Works without a prior :meth:`claim` (the offline ``run --store`` path).
        """
        result_json = result.model_dump(mode="json")
        t = _requests
        now = utcnow()
        insert = self._insert(t).values(
            request_id=result.request_id,
            repo_id=_text_id(result.repo_id),
            status="done",
            attempts=1,
            result=result_json,
            received_at=now,
            finished_at=now,
            updated_at=now,
        )
        finish = insert.on_conflict_do_update(
            index_elements=[t.c.request_id],
            set_={
                "status": "done",
                "result": insert.excluded.result,
                "reason": None,
                "error": None,
                "finished_at": now,
                "repo_id": func.coalesce(insert.excluded.repo_id, t.c.repo_id),
                "updated_at": now,
            },
            where=t.c.status != "done",
        ).returning(t.c.id)
        async with self._transaction() as conn:
            if (await conn.execute(finish)).first() is None:
                stored = await conn.scalar(
                    select(t.c.result).where(t.c.request_id == result.request_id)
                )
                return False, stored if isinstance(stored, dict) else {}
            framework_id = await self._framework_id(conn, result, config)
            grid_id = await self._grid_id(conn, config)
            weights = config.weights
            await conn.execute(
                self._insert(_metadata)
                .values(
                    repo_id=str(result.repo_id),
                    precision_score=result.model.precision,
                    roc_auc=result.model.roc_auc,
                    training_time=result.model.training_seconds,
                    number_of_training_data_rows=result.model.training_rows,
                    w1_daily_weighted_fix_rate=weights.w1,
                    w2_historical_weighted_fix_rate=weights.w2,
                    w3_fix_probability=weights.w3,
                    w4_severity=weights.w4,
                    last_training=_aware(result.finished_at),
                    model_framework_id=framework_id,
                    grid_search_model_parameters_id=grid_id,
                    deployflag_version=result.deployflag_version,
                    created_at=now,
                    request_id=result.request_id,
                )
                .on_conflict_do_nothing(index_elements=[_metadata.c.request_id])
            )
        return True, result_json

    async def _framework_id(
        self, conn: AsyncConnection, result: TrainingResult, config: PipelineConfig
    ) -> int:
        estimator = result.model.estimator or config.model.estimator
        library = sklearn_version()
        return await self._versioned_id(
            conn,
            _frameworks,
            f"{estimator}:{library}",
            model_name=estimator,
            model_version=library,
        )

    async def _grid_id(self, conn: AsyncConnection, config: PipelineConfig) -> int:
        spec = config.model
        return await self._versioned_id(
            conn,
            _grids,
            spec.grid_version,
            objective=spec.objective,
            eval_metric=spec.eval_metric,
            parameters={
                "grid": spec.param_grid,
                "cv_folds": spec.cv_folds,
                "random_state": spec.random_state,
            },
        )

    async def _versioned_id(
        self, conn: AsyncConnection, table: Table, version: str, **values: Any
    ) -> int:
        """Insert-if-absent, then read: concurrent writers of one version end with one row."""
        await conn.execute(
            self._insert(table)
            .values(version=version, created_at=utcnow(), **values)
            .on_conflict_do_nothing(index_elements=[table.c.version])
        )
        row_id = await conn.scalar(select(table.c.id).where(table.c.version == version))
        assert isinstance(row_id, int)
        return row_id

    async def record_failure(
        self, request_id: str, repo_id: str | int | None, reason: str, error: str
    ) -> None:
        """Park the request with a reason code and an error text; a done request stays done."""
        t = _requests
        now = utcnow()
        insert = self._insert(t).values(
            request_id=request_id,
            repo_id=_text_id(repo_id),
            status="parked",
            attempts=1,
            reason=reason[:REASON_LENGTH],
            error=redact(error)[:MAX_ERROR_LENGTH],
            received_at=now,
            finished_at=now,
            updated_at=now,
        )
        upsert = insert.on_conflict_do_update(
            index_elements=[t.c.request_id],
            set_={
                "status": "parked",
                "reason": insert.excluded.reason,
                "error": insert.excluded.error,
                "finished_at": now,
                "repo_id": func.coalesce(insert.excluded.repo_id, t.c.repo_id),
                "updated_at": now,
            },
            where=t.c.status != "done",
        )
        async with self._transaction() as conn:
            await conn.execute(upsert)

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The request's row as a dict (for tests and audit), or None."""
        async with guard(self._target), self._engine.connect() as conn:
            row = (
                await conn.execute(select(_requests).where(_requests.c.request_id == request_id))
            ).first()
        return None if row is None else dict(row._mapping)
