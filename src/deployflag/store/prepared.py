"""Statements compiled once and run on the SQLite writer's own driver connection.

Every request writes the same two or three statements. Through ``Connection.execute`` SQLAlchemy
builds an execution context, a cursor result and its metadata, and fires its events for each one,
which costs several times what SQLite spends running it; in the writer thread that was the largest
share of the service's CPU per small request. A :class:`Prepared` statement keeps what SQLAlchemy
compiled (its SQL and its bound-parameter names) and each parameter's bind processor, so values
reach the file exactly as SQLAlchemy would store them (the same timestamp text, the same JSON),
and runs it on the ``sqlite3`` connection inside the writer's transaction. Driver errors are
wrapped as SQLAlchemy wraps them, so the store's error mapping sees no difference.

On PostgreSQL the same compiled form runs through ``Connection.exec_driver_sql``: SQLAlchemy
2.0 compiles a dialect upsert on every execution (it has no cache key), and that compilation was
the largest share of the main process's CPU per request there. The statement still goes through
SQLAlchemy's connection, so its error wrapping and its handling of a lost connection are its own.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any, cast

from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

_DIALECT = SQLiteDialect_pysqlite(paramstyle="named")


class Prepared:
    """One statement, SQL compiled once for ``dialect``, values converted by their column
    types. The default dialect is the SQLite writer's ``sqlite3`` with named parameters."""

    def __init__(self, statement: ClauseElement, dialect: Dialect = _DIALECT) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
        self.sql = compiled.string
        # Positional dialects (asyncpg's $1, $2 …) take the values in this order; a name bound
        # twice appears twice.
        self._order = compiled.positiontup if dialect.positional else None
        # Constants of the statement (a status, attempts = 1) travel as bound parameters too.
        self._defaults: dict[str, Any] = dict(compiled.params)
        self._convert: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._convert[name] = processor

    def parameters(self, values: Mapping[str, Any]) -> dict[str, Any]:
        params = {**self._defaults, **values}
        for name, convert in self._convert.items():
            params[name] = convert(params[name])
        return params

    def first(self, conn: Connection, values: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run with ``values`` on the ``sqlite3`` connection under ``conn``, in its transaction;
        the first row it returns, if any."""
        return execute(conn, self.sql, self.parameters(values))

    def first_via_sqlalchemy(
        self, conn: Connection, values: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        """Run with ``values`` through ``conn`` itself (any driver), in its transaction; the
        first row it returns, if any."""
        params = self.parameters(values)
        bound = tuple(params[name] for name in self._order) if self._order else params
        result = conn.exec_driver_sql(self.sql, bound)
        row = result.first() if result.returns_rows else None
        return None if row is None else tuple(row)


def execute(
    conn: Connection, sql: str, params: Mapping[str, Any] | None = None
) -> tuple[Any, ...] | None:
    """Run ``sql`` on ``conn``'s ``sqlite3`` connection; its first row, if any. A driver error
    comes out wrapped as SQLAlchemy wraps it (an ``OperationalError`` for a locked database, a
    full disk …), so the store maps it as it maps any other."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, params or {})
        row = cursor.fetchone()
    except sqlite3.Error as exc:
        raise sa_exc.DBAPIError.instance(sql, params, exc, sqlite3.Error, dialect=_DIALECT) from exc
    finally:
        cursor.close()
    return None if row is None else tuple(row)
