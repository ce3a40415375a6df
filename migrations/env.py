"""Alembic environment: async engines, the service's own settings, no URL in alembic.ini.

Two ways in:
- from deployflag (``deployflag.store.migrate``): the caller already holds a connection inside a
  transaction and passes it as ``config.attributes["connection"]``; we just run on it;
- from the ``alembic`` command line: we build the engine from ``load_settings()`` and run it with
  ``asyncio.run`` (there is no running loop there).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from deployflag.settings import load_settings
from deployflag.store.engine import create_engine
from deployflag.store.tables import Base

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; autogenerate batch (copy-and-move) operations for it.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_on(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_engine(load_settings())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


def run_offline() -> None:
    """``alembic upgrade head --sql``: print the SQL instead of running it."""
    context.configure(
        url=load_settings().db_url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


shared = config.attributes.get("connection")
if shared is not None:
    run_on(shared)
elif context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
