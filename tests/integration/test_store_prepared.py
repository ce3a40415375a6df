"""The per-request statements are compiled once (store/prepared.py): the SQLite writer runs them on
the driver connection, PostgreSQL through ``exec_driver_sql``. Either way the rows must come out
exactly as SQLAlchemy's own execution writes them, every call must return what it returns that
way, and driver errors must reach the store's error mapping as SQLAlchemy's would."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, exc, insert

from deployflag.errors import FatalError
from deployflag.pipeline.config import PipelineConfig
from deployflag.settings import Settings, load_settings
from deployflag.store import Store, repository
from deployflag.store.prepared import Prepared
from deployflag.store.tables import TrainingRequest
from tests.support.postgres import PostgresCluster
from tests.support.store import make_result

CONFIG = PipelineConfig(scoring="seed")
FROZEN = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
TABLES = ("training_request", "model_performance_metadata")


async def raw_rows(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored value as SQLite holds it (text for timestamps and JSON), ids left out."""
    out = {}
    async with store.engine.connect() as conn:
        for table in TABLES:
            result = await conn.exec_driver_sql(f"SELECT * FROM {table} ORDER BY request_id")
            out[table] = [tuple(row)[1:] for row in result]
    return out


Written = tuple[dict[str, list[tuple[Any, ...]]], list[Any]]


async def written_with(settings: Settings) -> Written:
    """:func:`requests_written` on a store of its own."""
    async with await Store.open(settings) as store:
        return await requests_written(store)


async def requests_written(store: Store) -> Written:
    """Every kind of write, and what each call returned (rare paths included: a claim that finds
    the request done or with another body, a record that finds it done)."""
    returned: list[Any] = [
        await store.claim("claimed", 7, "a" * 64),
        await store.claim("claimed", 7, "a" * 64),  # counted twice
        await store.record_result(make_result("recorded", 8), CONFIG),
        await store.claim_and_record(
            make_result("folded", "x-9", roc_auc=None), CONFIG, "b" * 64, 3
        ),
        await store.claim("recorded", 8),  # done: its stored result, read back
        await store.claim("folded", "x-9", "c" * 64),  # another body: a conflict
        await store.record_result(make_result("recorded", 8), CONFIG),  # done: nothing written
        await store.claim_and_record(make_result("folded", "x-9"), CONFIG, "b" * 64, 3),
    ]
    await store.record_failure("failed", 11, "bad_data", "the first park")
    # A second park of the same request: the row keeps its repo id, takes the new error.
    await store.record_failure("failed", None, "bad_data", "no route to amqp://u:secret@host/")
    await store.record_failure("recorded", 8, "bad_data", "a done request stays done")
    return await raw_rows(store), returned


class ThroughSqlalchemy:
    """Stands in for Prepared: the same statement, run by ``Connection.execute``."""

    def __init__(self, statement: Any, dialect: Any = None) -> None:
        self._statement = statement

    def first(self, conn: Any, values: dict[str, Any]) -> tuple[Any, ...] | None:
        result = conn.execute(self._statement, values)
        row = result.first() if result.returns_rows else None
        return None if row is None else tuple(row)

    first_via_sqlalchemy = first


async def written_both_ways(
    monkeypatch: pytest.MonkeyPatch, settings_for: Callable[[str], Settings]
) -> dict[str, list[tuple[Any, ...]]]:
    """The rows the same requests leave, written once through the store's compiled statements and
    once through SQLAlchemy's own execution, each on a database of its own: they must be equal.
    Returns the first (compiled) one."""
    monkeypatch.setattr(repository, "utcnow", lambda: FROZEN)
    written = []
    for name in ("prepared", "sqlalchemy"):
        if name == "sqlalchemy":
            monkeypatch.setattr(repository, "Prepared", ThroughSqlalchemy)
        written.append(await written_with(settings_for(name)))
    (prepared, returned), (through_sqlalchemy_rows, returned_by_sqlalchemy) = written
    assert prepared == through_sqlalchemy_rows
    assert returned == returned_by_sqlalchemy
    claimed_done, conflict = returned[4], returned[5]
    assert (claimed_done.status, claimed_done.result["request_id"]) == ("done", "recorded")
    assert (conflict.status, conflict.known_repo_id) == ("conflict", "x-9")
    assert returned[6][0] is False, "recorded once"
    assert returned[7].claim.status == "done"
    assert len(prepared["training_request"]) == 4
    assert len(prepared["model_performance_metadata"]) == 2
    failed = prepared["training_request"][1]
    assert failed[:3] == ("failed", "11", "parked")  # request id, repo id kept, status
    assert "no route to amqp://u:***@host/" in failed  # redacted before it is stored
    return prepared


async def test_the_writer_stores_what_sqlalchemy_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sqlite(name: str) -> Settings:
        url = f"sqlite+aiosqlite:///{tmp_path / name / 'deployflag.db'}"
        return load_settings(database_url=url, data_dir=tmp_path / name)

    await written_both_ways(monkeypatch, sqlite)


@pytest.mark.postgres
async def test_postgresql_stores_what_sqlalchemy_stores(
    postgres: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def postgresql(name: str) -> Settings:
        url = postgres.fresh_database(f"prepared_{name}")
        return load_settings(database_url=url, data_dir=tmp_path / name, auto_migrate=True)

    prepared = await written_both_ways(monkeypatch, postgresql)
    assert prepared["training_request"][0][1:3] == ("7", "pending")  # repo id and status
    statuses = [row[2] for row in prepared["training_request"]]
    assert statuses == ["pending", "parked", "done", "done"]


def test_prepared_parameters_go_through_the_column_types() -> None:
    table = TrainingRequest.__table__
    statement = insert(table).values(
        request_id=bindparam("rid", type_=table.c.request_id.type),
        status="pending",
        result=bindparam("result", type_=table.c.result.type),
        updated_at=bindparam("now", type_=table.c.updated_at.type),
    )
    params = Prepared(statement).parameters({"rid": "r", "result": {"b": 1, "a": 2}, "now": FROZEN})
    assert params["rid"] == "r"
    assert params["result"] == '{"a": 2, "b": 1}'  # JSONText: sorted keys
    assert params["now"] == "2026-03-04 05:06:07.890123"  # naive UTC text, as SQLAlchemy stores
    assert "pending" in params.values()  # the constant travels as a parameter
    with pytest.raises(ValueError, match="naive datetime"):
        Prepared(statement).parameters({"rid": "r", "result": None, "now": datetime(2026, 1, 1)})


async def test_a_driver_error_is_mapped_like_sqlalchemys(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'file.db'}"
    store = await Store.open(load_settings(database_url=url, data_dir=tmp_path))
    try:

        def missing_table(conn: Any) -> None:
            raw = Prepared(insert(TrainingRequest.__table__).values(request_id="x"))
            raw.sql = "INSERT INTO no_such_table VALUES (1)"  # sqlite3.OperationalError
            raw.first(conn, {})

        with pytest.raises(exc.OperationalError) as raised:
            await store._writer.run(missing_table)  # type: ignore[union-attr]
        assert isinstance(raised.value.orig, sqlite3.OperationalError)
        # Through the store's guard, as any other write: "no such table" on SQLite means the
        # file was replaced behind the service's back (fatal), not a bug.
        with pytest.raises(FatalError, match="no such table"):
            await store._write(missing_table)
    finally:
        await store.close()


async def test_a_sqlite_uri_stores_and_returns_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``file:`` URI has no writer thread: its statements run as SQLAlchemy's cached text,
    and every call must return what the writer thread's returns."""
    monkeypatch.setattr(repository, "utcnow", lambda: FROZEN)
    uri = f"sqlite+aiosqlite:///file:{tmp_path / 'uri.db'}?uri=true"
    through_writer = await written_with(
        load_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'file.db'}", data_dir=tmp_path)
    )
    assert await written_with(load_settings(database_url=uri, data_dir=tmp_path)) == through_writer
