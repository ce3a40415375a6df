"""Schema migrations with Alembic, driven from async code.

Alembic's own async ``env.py`` calls ``asyncio.run``, which cannot run inside a running loop. So
here we open the connection ourselves and hand Alembic its synchronous face through
``conn.run_sync``, passing it in ``config.attributes["connection"]`` ("connection sharing");
``migrations/env.py`` uses that connection when present and makes its own engine only when run by
the ``alembic`` command line.

Concurrent start-ups are serialised: the migration runs in one transaction that first takes a lock
(PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``), so the second instance finds the
schema already at head and does nothing.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from deployflag.errors import FatalError
from deployflag.exitcodes import RET_CONFIG
from deployflag.settings import Settings
from deployflag.store.engine import create_engine
from deployflag.store.failures import Target, guard

# pg_advisory_xact_lock key: any constant shared by every deployflag build ("deployfl" in ASCII).
PG_MIGRATION_LOCK_KEY = 0x6465706C6F79666C


def migrations_dir(settings: Settings | None = None) -> Path:
    """``settings.migrations_dir``, else ``migrations/`` next to ``src/``, else ``./migrations``."""
    if settings is not None and settings.migrations_dir is not None:
        return settings.migrations_dir
    source_tree = Path(__file__).resolve().parents[3] / "migrations"
    if (source_tree / "env.py").is_file():
        return source_tree
    return Path.cwd() / "migrations"


def alembic_config(settings: Settings | None = None) -> Config:
    """An Alembic config without an ini file: no URL in it, and no logging set-up of its own."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir(settings)))
    return config


def head(settings: Settings | None = None) -> str:
    """The revision this build's migrations end at."""
    try:
        revision = ScriptDirectory.from_config(alembic_config(settings)).get_current_head()
    except CommandError as exc:
        raise FatalError(f"migrations: {exc}", exit_code=RET_CONFIG) from None
    if revision is None:
        raise FatalError(f"no migrations found in {migrations_dir(settings)}", RET_CONFIG)
    return revision


async def current(settings: Settings) -> str | None:
    """The database's revision; None for an empty database."""
    engine = create_engine(settings)
    try:
        return await current_revision(engine)
    finally:
        await engine.dispose()


async def upgrade(settings: Settings, revision: str = "head") -> None:
    engine = create_engine(settings)
    try:
        await upgrade_engine(engine, settings, revision)
    finally:
        await engine.dispose()


async def downgrade(settings: Settings, revision: str) -> None:
    engine = create_engine(settings)
    try:
        await _run(engine, settings, "downgrade", revision)
    finally:
        await engine.dispose()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with guard(Target.from_url(engine.url)), engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade_engine(engine: AsyncEngine, settings: Settings, revision: str = "head") -> None:
    await _run(engine, settings, "upgrade", revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _run(engine: AsyncEngine, settings: Settings, verb: str, revision: str) -> None:
    config = alembic_config(settings)

    def migrate(connection: Connection) -> None:
        config.attributes["connection"] = connection
        if verb == "upgrade":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)

    async with guard(Target.from_url(engine.url)), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK_KEY}
            )
        try:
            await conn.run_sync(migrate)
        except CommandError as exc:
            raise FatalError(f"migrate {verb} {revision}: {exc}", RET_CONFIG) from None


def known_revisions(settings: Settings | None = None) -> set[str]:
    """Every revision this build's migrations contain."""
    script = ScriptDirectory.from_config(alembic_config(settings))
    return {rev.revision for rev in script.walk_revisions()}
