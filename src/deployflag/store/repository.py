"""The few queries the service needs (docs/database.md), each one transaction, each race-free.

Every write is a single upsert (``INSERT … ON CONFLICT``) rather than read-then-write, so any
number of processes on any number of machines can run them at once. Both SQLite (≥ 3.35) and
PostgreSQL speak that dialect; only the import of ``insert`` differs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, cached_property
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

from sqlalchemy import Table, bindparam, case, func, select, text
from sqlalchemy import insert as plain_insert
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.dialects.sqlite.base import SQLiteDialect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from deployflag import logs
from deployflag.errors import FatalError, InvalidRequest
from deployflag.exitcodes import RET_CONFIG
from deployflag.messages import TrainingResult
from deployflag.pipeline.config import PipelineConfig
from deployflag.redaction import redact
from deployflag.settings import Settings
from deployflag.store import migrate
from deployflag.store.engine import create_engine, sqlite_writer_engine
from deployflag.store.failures import Target, guard
from deployflag.store.prepared import Prepared
from deployflag.store.tables import (
    REASON_LENGTH,
    GridSearchParameter,
    ModelFramework,
    ModelPerformanceMetadata,
    TrainingRequest,
    utcnow,
)
from deployflag.store.writer import GroupWriter

MAX_ERROR_LENGTH = 10_000
_log = logs.get_logger("deployflag.store")
T = TypeVar("T")

_requests: Table = TrainingRequest.__table__  # type: ignore[assignment]
_frameworks: Table = ModelFramework.__table__  # type: ignore[assignment]
_grids: Table = GridSearchParameter.__table__  # type: ignore[assignment]
_metadata: Table = ModelPerformanceMetadata.__table__  # type: ignore[assignment]
# Every column of a metadata row but its id, in the order the record writes them.
_METADATA_COLUMNS = tuple(c.name for c in _metadata.columns if c.name != "id")

# A statement as the store runs it: values in, the first returned row (or None) out.
Statement = Callable[[Connection, dict[str, Any]], tuple[Any, ...] | None]


@dataclass(frozen=True)
class Claim:
    """What :meth:`Store.claim` found: work to do (``pending``) or a stored result (``done``)."""

    status: Literal["pending", "done", "conflict"]
    attempts: int
    result: dict[str, Any] | None = None
    # ``conflict``: the request id is known with another body; the stored row's repo id.
    known_repo_id: str | None = None


@dataclass(frozen=True)
class Folded:
    """What :meth:`Store.claim_and_record` did: the claim, and whether the result was recorded
    (``stored``: the result as stored, when it was)."""

    claim: Claim
    recorded: bool = False
    stored: dict[str, Any] | None = None


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
        # Ids of versioned rows (model_framework, grid_search_parameter) known to be committed:
        # they never change once written, so each is looked up once per process, not per request.
        self._versioned: dict[tuple[str, str], int] = {}
        # SQLite has one writer at a time, and aiosqlite makes every cursor, execute, fetch and
        # close a round trip between the loop and its thread (~20 per request). So each write
        # transaction runs whole, with the synchronous driver, in one thread of the store's own:
        # one round trip per transaction, this process's writers queue there, not in SQLite's
        # busy handler (which polls with sleeps of up to 100 ms), and the transactions queued
        # at once share one commit (store/writer.py).
        writer_engine = sqlite_writer_engine(settings)
        self._writer = GroupWriter(writer_engine) if writer_engine is not None else None
        self._writers = asyncio.Lock()  # a SQLite file: URI: one async writer at a time

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
        if self._writer is not None:
            await self._writer.close()
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

    async def _write(self, body: Callable[[Connection], T]) -> T:
        """Run ``body`` as one write transaction, committed at its end; database trouble mapped
        to our errors. SQLite files: in the writer thread; otherwise through the async driver."""
        async with guard(self._target):
            if self._writer is not None:
                return await self._writer.run(body)
            if self._engine.dialect.name == "sqlite":
                async with self._writers, self._engine.begin() as conn:
                    return await conn.run_sync(body)
            async with self._engine.begin() as conn:
                return await conn.run_sync(body)

    def _insert(self, table: Table) -> PgInsert | SqliteInsert:
        if self._engine.dialect.name == "postgresql":
            return pg_insert(table)
        return sqlite_insert(table)

    # --- the upserts of every request (and of every park), built once ----------------------
    # Building an upsert (its ``excluded`` alias above all) costs more than running it, and
    # SQLAlchemy 2.0 compiles dialect upserts on every execution anyway (they have no cache key).

    def _reusable(self, statement: Any) -> Any:
        """The SQLite statement as ``text()``, which SQLAlchemy compiles once and then takes from
        its cache; bound values keep their column types, constants become defaults."""
        dialect = SQLiteDialect(paramstyle="named")
        compiled = statement.compile(dialect=dialect)
        params = compiled.params
        binds = {
            name: bindparam(name, value=params.get(name), type_=bind.type)
            for bind, name in compiled.bind_names.items()
        }
        return text(compiled.string).bindparams(*binds.values())

    def _statement(self, statement: Any) -> Statement:
        """``statement`` for the connections this store writes with, compiled once
        (store/prepared.py): SQLite files through the writer thread's driver connection,
        PostgreSQL through SQLAlchemy's, a SQLite ``file:`` URI as SQLAlchemy's cached
        ``text()``."""
        if self._writer is not None:
            return Prepared(statement).first
        if self._engine.dialect.name == "postgresql":
            return Prepared(statement, self._engine.dialect).first_via_sqlalchemy
        reusable = self._reusable(statement)

        def run(conn: Connection, values: dict[str, Any]) -> tuple[Any, ...] | None:
            result = conn.execute(reusable, values)
            row = result.first() if result.returns_rows else None
            return None if row is None else tuple(row)

        return run

    @cached_property
    def _metadata_row(self) -> Statement:
        # A plain INSERT of every column but the id, its values bound at execution.
        columns = {
            name: bindparam(name, type_=_metadata.c[name].type) for name in _METADATA_COLUMNS
        }
        return self._statement(plain_insert(_metadata).values(columns))

    def _request_upsert(
        self,
        values: dict[str, Any],
        changes: Callable[[Any], dict[str, Any]],
        *,
        same_body: bool = False,
    ) -> PgInsert | SqliteInsert:
        """Insert the request's row, or apply ``changes(excluded)`` to it unless it is done.

        Every transition keeps a known repo id and stamps ``updated_at`` with the row's time.
        ``same_body``: change the row only when its body digest (where both are known) matches.
        """
        t = _requests
        insert = self._insert(t).values(**values)
        excluded = insert.excluded
        where = t.c.status != "done"
        if same_body:
            where = where & (
                t.c.body_digest.is_(None)
                | excluded.body_digest.is_(None)
                | (t.c.body_digest == excluded.body_digest)
            )
            changes_ = changes
            changes = lambda ex: {  # noqa: E731
                **changes_(ex),
                "body_digest": func.coalesce(t.c.body_digest, ex.body_digest),
            }
        return insert.on_conflict_do_update(
            index_elements=[t.c.request_id],
            set_={
                **changes(excluded),
                "repo_id": func.coalesce(excluded.repo_id, t.c.repo_id),
                "updated_at": values["updated_at"],
            },
            where=where,
        )

    @staticmethod
    def _bound_row(**values: Any) -> dict[str, Any]:
        """Values of a reusable request upsert: ids and time bound at execution."""
        t = _requests
        now = bindparam("now", type_=t.c.updated_at.type)
        return {
            "request_id": bindparam("request_id", type_=t.c.request_id.type),
            "repo_id": bindparam("repo_id", type_=t.c.repo_id.type),
            "attempts": 1,
            "received_at": now,
            "updated_at": now,
            **values,
        }

    @cached_property
    def _claim_upsert(self) -> Any:
        t = _requests
        upsert = self._request_upsert(
            self._bound_row(
                status="pending", body_digest=bindparam("body_digest", type_=t.c.body_digest.type)
            ),
            lambda _: {
                "status": "pending",
                "attempts": case((t.c.status == "parked", 1), else_=t.c.attempts + 1),
                "reason": None,
                "error": None,
                "finished_at": None,
            },
            same_body=True,
        )
        return self._statement(upsert.returning(t.c.attempts))

    def _finishing_upsert(self, status: str, columns: tuple[str, ...]) -> Any:
        """The request ends as ``status`` (done, parked) with ``columns`` bound at execution;
        the reason and error are cleared unless they are among them."""
        t = _requests
        row = self._bound_row(
            status=status, **{name: bindparam(name, type_=t.c[name].type) for name in columns}
        )
        row["finished_at"] = row["updated_at"]
        return self._request_upsert(
            row,
            lambda excluded: {
                "reason": None,
                "error": None,
                "status": status,
                **{name: excluded[name] for name in columns},
                "finished_at": row["updated_at"],
            },
        )

    @cached_property
    def _finish_upsert(self) -> Any:
        upsert = self._finishing_upsert("done", ("result",))
        return self._statement(upsert.returning(_requests.c.id))

    @cached_property
    def _failure_upsert(self) -> Any:
        return self._statement(self._finishing_upsert("parked", ("reason", "error")))

    # --- requests ------------------------------------------------------------------------

    def _claim_body(
        self, request_id: str, repo_id: str | int | None, body_digest: str | None
    ) -> Callable[[Connection], Claim]:
        t = _requests
        upsert = self._claim_upsert
        values = {
            "request_id": request_id,
            "repo_id": _text_id(repo_id),
            "now": utcnow(),
            "body_digest": body_digest,
        }

        def transaction(conn: Connection) -> Claim:
            claimed = upsert(conn, values)
            if claimed is not None:
                return Claim(status="pending", attempts=claimed[0])
            # Nothing was written: the row is done, or holds another body (its digest never
            # changes once set), so what is read here is final.
            row = conn.execute(
                select(t.c.attempts, t.c.result, t.c.body_digest, t.c.repo_id).where(
                    t.c.request_id == request_id
                )
            ).one()
            if body_digest is not None and row.body_digest not in (None, body_digest):
                return Claim(status="conflict", attempts=row.attempts, known_repo_id=row.repo_id)
            return Claim(status="done", attempts=row.attempts, result=row.result)

        return transaction

    async def claim(
        self, request_id: str, repo_id: str | int | None, body_digest: str | None = None
    ) -> Claim:
        """Start (or restart) work on a request, counting the attempt.

        New → pending, attempts 1; pending → attempts + 1; parked → pending again with attempts 1
        (a re-drive from the failed queue); done → unchanged, with its stored result. A row whose
        body digest differs from ``body_digest`` (both known) is left alone: ``conflict``.
        """
        return await self._write(self._claim_body(request_id, repo_id, body_digest))

    async def claim_and_record(
        self,
        result: TrainingResult,
        config: PipelineConfig,
        body_digest: str | None,
        max_attempts: int,
    ) -> Folded:
        """:meth:`claim` and, when the claim leaves work to do within ``max_attempts``,
        :meth:`record_result`, in one transaction: for a result computed before its claim was
        written. The attempt is counted as by a claim of its own."""
        claim = self._claim_body(result.request_id, result.repo_id, body_digest)
        record, found = self._record_body(result, config)

        def transaction(conn: Connection) -> Folded:
            claimed = claim(conn)
            if claimed.status != "pending" or claimed.attempts > max_attempts:
                return Folded(claimed)
            fresh, stored = record(conn)
            return Folded(claimed, recorded=fresh, stored=stored)

        outcome = await self._write(transaction)
        self._versioned.update(found)  # committed: safe to reuse from now on
        return outcome

    async def record_result(
        self, result: TrainingResult, config: PipelineConfig
    ) -> tuple[bool, dict[str, Any]]:
        """Mark the request done and write its metadata row, in one transaction.

        Returns ``(True, result_json)`` when this call finished the request, or
        ``(False, stored_result)`` when it was already done (nothing else is written then).
        Works without a prior :meth:`claim` (the offline ``run --store`` path).
        """
        transaction, found = self._record_body(result, config)
        outcome = await self._write(transaction)
        self._versioned.update(found)  # committed: safe to reuse from now on
        return outcome

    def _record_body(
        self, result: TrainingResult, config: PipelineConfig
    ) -> tuple[Callable[[Connection], tuple[bool, dict[str, Any]]], dict[tuple[str, str], int]]:
        """The transaction of :meth:`record_result`, and the versioned ids it finds (to
        remember once it has committed)."""
        result_json = result.model_dump(mode="json")
        t = _requests
        now = utcnow()
        finish, insert = self._finish_upsert, self._metadata_row
        values = {
            "request_id": result.request_id,
            "repo_id": _text_id(result.repo_id),
            "result": result_json,
            "now": now,
        }
        found: dict[tuple[str, str], int] = {}

        def transaction(conn: Connection) -> tuple[bool, dict[str, Any]]:
            if finish(conn, values) is None:
                stored = conn.scalar(select(t.c.result).where(t.c.request_id == result.request_id))
                return False, stored if isinstance(stored, dict) else {}
            framework_id = self._framework_id(conn, result, config, found)
            grid_id = self._grid_id(conn, config, found)
            weights = config.weights
            # A plain INSERT, one statement with its values bound at execution (compiled once;
            # dialect upserts are compiled on every execution): the upsert above moved the
            # request to done in this transaction, so no metadata row for it can exist yet.
            insert(
                conn,
                {
                    "repo_id": str(result.repo_id),
                    "precision_score": result.model.precision,
                    "roc_auc": result.model.roc_auc,
                    "training_time": result.model.training_seconds,
                    "number_of_training_data_rows": result.model.training_rows,
                    "w1_daily_weighted_fix_rate": weights.w1,
                    "w2_historical_weighted_fix_rate": weights.w2,
                    "w3_fix_probability": weights.w3,
                    "w4_severity": weights.w4,
                    "last_training": _aware(result.finished_at),
                    "model_framework_id": framework_id,
                    "grid_search_model_parameters_id": grid_id,
                    "deployflag_version": result.deployflag_version,
                    "created_at": now,
                    "request_id": result.request_id,
                    "scoring": result.scoring,
                    "half_life_days": result.model.half_life_days,
                    "blend_weight": result.model.blend_weight,
                },
            )
            return True, result_json

        return transaction, found

    def _framework_id(
        self,
        conn: Connection,
        result: TrainingResult,
        config: PipelineConfig,
        found: dict[tuple[str, str], int],
    ) -> int:
        estimator = result.model.estimator or config.model.estimator
        library = sklearn_version()
        return self._versioned_id(
            conn,
            found,
            _frameworks,
            f"{estimator}:{library}",
            model_name=estimator,
            model_version=library,
        )

    def _grid_id(
        self, conn: Connection, config: PipelineConfig, found: dict[tuple[str, str], int]
    ) -> int:
        version, objective, eval_metric, parameters = config.model_definition()
        return self._versioned_id(
            conn,
            found,
            _grids,
            version,
            objective=objective,
            eval_metric=eval_metric,
            parameters=parameters,
        )

    def _versioned_id(
        self,
        conn: Connection,
        found: dict[tuple[str, str], int],
        table: Table,
        version: str,
        **values: Any,
    ) -> int:
        """Insert-if-absent, then read: concurrent writers of one version end with one row.

        Once a transaction that wrote or read the row has committed, the id comes from memory.
        """
        key = (table.name, version)
        known = self._versioned.get(key)
        if known is not None:
            return known
        conn.execute(
            self._insert(table)
            .values(version=version, created_at=utcnow(), **values)
            .on_conflict_do_nothing(index_elements=[table.c.version])
        )
        row_id = conn.scalar(select(table.c.id).where(table.c.version == version))
        assert isinstance(row_id, int)
        found[key] = row_id
        return row_id

    async def record_failure(
        self, request_id: str, repo_id: str | int | None, reason: str, error: str
    ) -> None:
        """Park the request with a reason code and an error text; a done request stays done."""
        upsert = self._failure_upsert
        values = {
            "request_id": request_id,
            "repo_id": _text_id(repo_id),
            "reason": reason[:REASON_LENGTH],
            "error": redact(error)[:MAX_ERROR_LENGTH],
            "now": utcnow(),
        }
        try:
            await self._write(lambda conn: upsert(conn, values))
        except InvalidRequest as exc:
            # The database refuses the ids themselves (a data exception): the parked copy on
            # the failed queue is then the only record, and it carries the reason.
            _log.warning("failure not recorded: the database refused the row", error=exc.message)

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The request's row as a dict (for tests and audit), or None."""
        async with guard(self._target), self._engine.connect() as conn:
            row = (
                await conn.execute(select(_requests).where(_requests.c.request_id == request_id))
            ).first()
        return None if row is None else dict(row._mapping)
