"""Alembic migrations on SQLite and PostgreSQL: up, down, up again; the models match the schema;
the ``alembic`` command line works with the same settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url

from deployflag.store import migrate
from deployflag.store.engine import create_engine
from deployflag.store.tables import Base
from tests.support.store import Database, database

__all__ = ["database"]  # the fixture, imported so that every test here runs on both backends

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "model_framework",
    "grid_search_parameter",
    "model_performance_metadata",
    "training_request",
    "training_request_park",
}


async def table_names(database: Database) -> set[str]:
    engine = create_engine(database.settings())
    try:
        async with engine.connect() as conn:
            names = await conn.run_sync(lambda c: inspect(c).get_table_names())
    finally:
        await engine.dispose()
    return set(names)


async def test_head_is_the_latest_revision() -> None:
    assert migrate.head() == "0004"
    assert migrate.known_revisions() == {"0001", "0002", "0003", "0004"}
    assert (migrate.migrations_dir() / "env.py").is_file()


async def test_rows_older_than_the_scoring_column_say_seed(database: Database) -> None:
    # Given a database at the initial revision with one metadata row in it
    settings = database.settings()
    await migrate.upgrade(settings, "0001")
    engine = create_engine(settings)
    now = "2021-01-01 00:00:00"
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO model_framework (id, version, model_name, model_version, "
                    f"created_at) VALUES (1, 'x:1', 'x', '1', '{now}')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO grid_search_parameter (id, version, objective, eval_metric, "
                    f"parameters, created_at) VALUES (1, 'g', 'o', 'e', '{{}}', '{now}')"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO model_performance_metadata (repo_id, training_time, "
                    "number_of_training_data_rows, w1_daily_weighted_fix_rate, "
                    "w2_historical_weighted_fix_rate, w3_fix_probability, w4_severity, "
                    "last_training, model_framework_id, grid_search_model_parameters_id, "
                    "deployflag_version, created_at, request_id) VALUES ('42', 0.1, 3, 0.3, "
                    f"0.3, 0.2, 0.2, '{now}', 1, 1, '1.0', '{now}', 'old')"
                )
            )
        # When it is migrated to head
        await migrate.upgrade(settings)
        # Then the old row was computed by the seed scoring, without half-life or blend
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT scoring, half_life_days, blend_weight "
                        "FROM model_performance_metadata WHERE request_id = 'old'"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    assert tuple(row) == ("seed", None, None)


async def test_upgrade_downgrade_upgrade(database: Database) -> None:
    settings = database.settings()
    assert await migrate.current(settings) is None

    await migrate.upgrade(settings)
    assert await migrate.current(settings) == migrate.head()
    assert await table_names(database) == TABLES | {"alembic_version"}

    await migrate.upgrade(settings)  # at head already: nothing to do
    assert await migrate.current(settings) == migrate.head()

    await migrate.downgrade(settings, "base")
    assert await migrate.current(settings) is None
    assert await table_names(database) == {"alembic_version"}

    await migrate.upgrade(settings, "head")
    assert await migrate.current(settings) == migrate.head()
    assert await table_names(database) == TABLES | {"alembic_version"}


async def test_models_match_the_migrated_schema(database: Database) -> None:
    settings = database.settings()
    await migrate.upgrade(settings)

    def differences(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(differences)
    finally:
        await engine.dispose()
    assert diff == []


def alembic_cli(database: Database, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYFLAG_")}
    env["DEPLOYFLAG_DATABASE_URL"] = database.url
    return subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_alembic_command_line_reads_the_settings(database: Database) -> None:
    """``alembic upgrade head`` runs env.py's own asyncio path, with the URL from the settings."""
    upgraded = alembic_cli(database, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    assert await migrate.current(database.settings()) == migrate.head()

    if database.kind == "sqlite":
        return
    # Offline mode prints the DDL for a DBA to review, with the URL from the settings.
    offline = alembic_cli(database, "upgrade", "head", "--sql")
    assert offline.returncode == 0, offline.stderr
    assert "CREATE TABLE training_request" in offline.stdout
    password = make_url(database.url).password
    assert not password or password not in offline.stdout + offline.stderr


BROKEN_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    op.add_column("training_request", sa.Column("extra", sa.Integer()))
    raise RuntimeError("migration failed halfway")


def downgrade() -> None:
    pass
"""


async def test_a_failed_migration_changes_nothing(database: Database, tmp_path: Path) -> None:
    """Each migration is one transaction, on SQLite too (the driver's implicit commits are off)."""
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.migrations_dir(), scripts, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head()
    (scripts / "versions" / "9999_broken.py").write_text(BROKEN_REVISION.format(head=head))
    settings = database.settings(migrations_dir=scripts)
    await migrate.upgrade(settings, head)

    with pytest.raises(RuntimeError, match="halfway"):
        await migrate.upgrade(settings)
    assert await migrate.current(settings) == head
    assert await table_names(database) == TABLES | {"alembic_version"}
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("training_request")}
            )
    finally:
        await engine.dispose()
    assert "extra" not in columns
