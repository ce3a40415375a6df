"""The async engine, tuned per backend: SQLite as a local file, PostgreSQL as a shared server."""

from __future__ import annotations

import ssl
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from deployflag import tls
from deployflag.errors import FatalError
from deployflag.exitcodes import RET_CONFIG
from deployflag.settings import Settings

SQLITE_BUSY_TIMEOUT_MS = 30_000
WAL_SWITCH_RETRY_SECONDS = 0.05
PG_POOL_SIZE = 5
PG_MAX_OVERFLOW = 10
PG_CONNECT_TIMEOUT = 10.0  # seconds to open one connection
PG_COMMAND_TIMEOUT = 60.0  # seconds for one statement; no query here should come close
POOL_TIMEOUT = 30.0  # seconds to wait for a free pooled connection
# A pooled PostgreSQL connection that sat unused this long is pinged before it is handed out.
PG_IDLE_PING_SECONDS = 1.0
_IDLE_SINCE = "deployflag_idle_since"


def sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None when the URL names none: in memory (which the
    settings refuse), or a ``file:`` URI, which SQLite resolves by its own rules."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def create_engine(settings: Settings) -> AsyncEngine:
    """An engine for ``settings.db_url``; nothing connects until first use."""
    url = make_url(settings.db_url)
    if settings.is_sqlite:
        return _sqlite_engine(url)
    return _postgres_engine(url, _postgres_ssl(settings))


def _postgres_ssl(settings: Settings) -> ssl.SSLContext | bool | None:
    """asyncpg's ``ssl`` argument: None leaves the driver's default, False is "disable"."""
    if settings.database_sslmode is None:
        return None
    context = tls.database_context(
        settings.database_sslmode,
        settings.database_sslrootcert,
        settings.database_sslcert,
        settings.database_sslkey,
    )
    return False if context is None else context


def _sqlite_engine(url: URL) -> AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FatalError(
                f"cannot create the data directory {path.parent}: {exc.strerror or exc} "
                "(check DEPLOYFLAG_DATA_DIR / DEPLOYFLAG_DATABASE_URL)",
                exit_code=RET_CONFIG,
            ) from None
    engine = create_async_engine(
        url,
        pool_timeout=POOL_TIMEOUT,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )
    _configure_sqlite(engine.sync_engine)
    return engine


def sqlite_writer_engine(settings: Settings) -> Engine | None:
    """A synchronous engine on the same SQLite file, for the store's writer thread (None for a
    ``file:`` URI, whose file the store does not name: it writes through the async engine)."""
    url = make_url(settings.db_url)
    if not settings.is_sqlite or sqlite_path(url) is None:
        return None
    engine = create_sync_engine(
        url.set(drivername="sqlite+pysqlite"),
        pool_size=1,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )
    _configure_sqlite(engine)
    return engine


def _configure_sqlite(sync_engine: Engine) -> None:
    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide where transactions begin (see _on_begin); this also
        # keeps the driver from committing before DDL, so a migration is one transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            _enable_wal(cursor)
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: concurrent writers queue on busy_timeout instead of failing
        # with SQLITE_BUSY when a deferred read lock cannot be upgraded. Writes here take
        # milliseconds, so serialising them costs nothing; WAL readers are never blocked.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _enable_wal(cursor: Any) -> None:
    """Put the file in WAL mode, which is persistent: only a new file needs the switch.

    The switch takes an exclusive lock, and SQLite answers a second process switching the same new
    file at the same moment with "database is locked" at once, without its busy handler (two
    instances starting together on a fresh file): so ask first, and retry a loser briefly.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        cursor.execute("PRAGMA journal_mode")
        if str(cursor.fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # in-memory databases stay "memory"
            return
        except Exception as exc:  # the driver's OperationalError: sqlite3's or aiosqlite's
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(WAL_SWITCH_RETRY_SECONDS)


def _postgres_engine(url: URL, ssl_arg: ssl.SSLContext | bool | None) -> AsyncEngine:
    # A context means "TLS, no fallback" to asyncpg; "disable" must be said explicitly (False),
    # or asyncpg tries TLS first ("prefer").
    tls_args: dict[str, Any] = {} if ssl_arg is None else {"ssl": ssl_arg}
    engine = create_async_engine(
        url,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_timeout=POOL_TIMEOUT,
        pool_recycle=1800,
        connect_args={
            "timeout": PG_CONNECT_TIMEOUT,
            "command_timeout": PG_COMMAND_TIMEOUT,
            "server_settings": {"application_name": "deployflag"},
            **tls_args,
        },
    )
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Ping a pooled connection on checkout when it has been idle at least
    ``PG_IDLE_PING_SECONDS``; a dead one is replaced before anybody uses it.

    SQLAlchemy's ``pool_pre_ping`` pings on every checkout, and its asyncpg ping is three round
    trips (BEGIN, an empty query, ROLLBACK, for PgBouncer's transaction mode): with the request's
    own BEGIN, three statements and COMMIT, 8 round trips instead of 5, and about a third of a
    millisecond of the main process's CPU per request. A connection goes stale while it sits
    unused (a server restart, an idle timeout); one in steady use that dies fails its
    transaction, SQLAlchemy then invalidates every connection of the pool opened before, and
    the store's caller retries.
    """
    sync = engine.sync_engine

    @event.listens_for(sync, "checkin")
    def _idle_from(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(sync, "checkout")
    def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        if since is None or time.monotonic() - since < PG_IDLE_PING_SECONDS:
            return
        try:
            sync.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces the connection and checks out again
            raise sa_exc.DisconnectionError(f"idle connection failed its ping: {exc}") from exc
