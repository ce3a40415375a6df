"""Store.open on both backends: zero set-up on SQLite, explicit migrations on PostgreSQL, and
one-line, password-free errors when the database is unreachable or refuses us."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import text

from deployflag.errors import FatalError, TransientError
from deployflag.settings import load_settings
from deployflag.store import Store, migrate
from deployflag.store import engine as engine_module
from tests.support.postgres import PostgresCluster
from tests.support.store import Database, database
from tests.support.toolkit import free_port

__all__ = ["database"]  # the fixture, imported so that every test here runs on both backends

MIGRATE_HINT = "run `python -m deployflag migrate`"


async def test_sqlite_needs_no_setup(tmp_path: Path) -> None:
    """A missing data directory is created and the schema migrated on first use."""
    data_dir = tmp_path / "nested" / "data"
    settings = load_settings(data_dir=data_dir)  # the default URL: DATA_DIR/deployflag.db
    assert settings.is_sqlite
    async with await Store.open(settings) as store:
        await store.ping()
        assert await migrate.current_revision(store.engine) == migrate.head()
        async with store.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 30_000
    assert (data_dir / "deployflag.db").is_file()


async def test_open_twice_is_harmless(database: Database) -> None:
    settings = database.settings(auto_migrate=True)
    async with await Store.open(settings), await Store.open(settings) as second:
        await second.ping()


async def test_unknown_revision_is_fatal(database: Database) -> None:
    """A schema migrated by a newer build stops an older one instead of being guessed at."""
    settings = database.settings(auto_migrate=True)
    await migrate.upgrade(settings)
    async with await Store.open(settings) as store, store.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    for attempt in (settings, database.settings(auto_migrate=False)):
        with pytest.raises(FatalError) as caught:
            await Store.open(attempt)
        assert caught.value.exit_code == 78
        assert "ffff" in str(caught.value)
    if database.kind == "postgres":
        assert "does not know" in str(caught.value)


async def test_unwritable_sqlite_location_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    settings = load_settings(database_url=f"sqlite+aiosqlite:///{blocker}/sub/deployflag.db")
    with pytest.raises(FatalError, match="cannot create the data directory") as caught:
        await Store.open(settings)
    assert caught.value.exit_code == 78


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.postgres
async def test_schema_behind_head_is_fatal_without_auto_migrate(postgres: PostgresCluster) -> None:
    url = postgres.fresh_database(f"t_{uuid.uuid4().hex[:16]}")
    with pytest.raises(FatalError) as caught:
        await Store.open(load_settings(database_url=url))
    assert caught.value.exit_code == 78
    message = str(caught.value)
    assert message.startswith("database schema is at ")
    assert f"this build needs {migrate.head()}" in message
    assert MIGRATE_HINT in message
    assert await migrate.current(load_settings(database_url=url)) is None  # nothing was done

    async with await Store.open(load_settings(database_url=url, auto_migrate=True)) as store:
        assert await migrate.current_revision(store.engine) == migrate.head()
    async with await Store.open(load_settings(database_url=url)) as store:  # now at head
        await store.ping()


@pytest.mark.postgres
async def test_unreachable_postgres_is_transient(postgres: PostgresCluster) -> None:
    port = free_port()
    url = postgres.url_for("deployflag", password="s3cret-Pa55", port=port)
    with pytest.raises(TransientError) as caught:
        await Store.open(load_settings(database_url=url))
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "s3cret-Pa55" not in message
    assert "\n" not in message


@pytest.mark.postgres
async def test_wrong_password_is_fatal_and_redacted(postgres: PostgresCluster) -> None:
    url = postgres.url_for("deployflag", password="wrong-Pa55word")
    with pytest.raises(FatalError) as caught:
        await Store.open(load_settings(database_url=url))
    assert caught.value.exit_code == 78
    message = str(caught.value)
    assert "password authentication failed" in message
    assert f"127.0.0.1:{postgres.port}" in message
    assert "wrong-Pa55word" not in message
    assert postgres.password not in message
    assert "\n" not in message


@pytest.mark.postgres
async def test_missing_database_is_fatal(postgres: PostgresCluster) -> None:
    with pytest.raises(FatalError) as caught:
        await Store.open(load_settings(database_url=postgres.url_for("no_such_db")))
    assert caught.value.exit_code == 78
    assert "no_such_db" in str(caught.value)
    assert postgres.password not in str(caught.value)


async def open_postgres_store(postgres: PostgresCluster) -> Store:
    url = postgres.fresh_database(f"t_{uuid.uuid4().hex[:16]}")
    return await Store.open(load_settings(database_url=url, auto_migrate=True))


@pytest.mark.postgres
async def test_store_recovers_after_postgres_restarts(postgres: PostgresCluster) -> None:
    async with await open_postgres_store(postgres) as store:
        assert (await store.claim("r", 1)).attempts == 1  # a pooled connection now exists
        await asyncio.to_thread(postgres.stop)
        try:
            with pytest.raises(TransientError, match=f"127.0.0.1:{postgres.port}") as caught:
                await store.claim("r", 1)
            assert postgres.password not in str(caught.value)
            with pytest.raises(TransientError):
                await store.ping()
        finally:
            await asyncio.to_thread(postgres.start)
        deadline = time.monotonic() + 30
        while True:  # the server accepts connections; the pool must replace its dead ones
            try:
                await store.ping()
                break
            except TransientError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert (await store.claim("r", 1)).attempts == 2


class Clock:
    """The store engine's clock, moved by hand (asyncio keeps the real one)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def engine_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(
        engine_module, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=time.sleep)
    )
    return clock


@pytest.mark.postgres
async def test_only_idle_postgres_connections_are_pinged(
    postgres: PostgresCluster, monkeypatch: pytest.MonkeyPatch, engine_clock: Clock
) -> None:
    async with await open_postgres_store(postgres) as store:
        dialect = store.engine.sync_engine.dialect
        pings: list[object] = []
        real_ping = dialect.do_ping

        def counting_ping(dbapi_connection: object) -> bool:
            pings.append(dbapi_connection)
            return real_ping(dbapi_connection)  # type: ignore[no-any-return]

        monkeypatch.setattr(dialect, "do_ping", counting_ping)
        # Given a connection in steady use: it is handed out without a ping
        for i in range(20):
            await store.claim(f"busy-{i}", 1)
            engine_clock.now += engine_module.PG_IDLE_PING_SECONDS / 2
        assert pings == []
        # When it has sat in the pool for the threshold: pinged once, on its next checkout
        engine_clock.now += engine_module.PG_IDLE_PING_SECONDS
        await store.claim("after-idle", 1)
        assert len(pings) == 1


@pytest.mark.postgres
async def test_an_idle_connection_killed_by_a_restart_is_replaced_unnoticed(
    postgres: PostgresCluster, engine_clock: Clock
) -> None:
    async with await open_postgres_store(postgres) as store:
        assert (await store.claim("r", 1)).attempts == 1  # a pooled connection now exists
        # Given the server restarted while that connection sat in the pool long enough
        await asyncio.to_thread(postgres.stop)
        await asyncio.to_thread(postgres.start)
        engine_clock.now += engine_module.PG_IDLE_PING_SECONDS
        # Then the next transaction gets a fresh connection, without an error to retry
        assert (await store.claim("r", 1)).attempts == 2


def test_sqlite_file_is_readable_with_the_stdlib(tmp_path: Path) -> None:
    """The debugging recipe of docs/database.md."""

    async def record() -> None:
        from tests.support.store import make_result

        settings = load_settings(data_dir=tmp_path)
        async with await Store.open(settings) as store:
            await store.record_result(make_result("doc"), settings.pipeline_config())

    asyncio.run(record())
    with sqlite3.connect(tmp_path / "deployflag.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT * FROM model_performance_metadata").fetchall()
    assert [row["request_id"] for row in rows] == ["doc"]
