"""`deployflag requests show` against real SQLite and PostgreSQL databases, as a subprocess."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from deployflag import exitcodes
from deployflag.store import Store
from deployflag.store.audit import note_park
from tests.integration.test_cli import deployflag, one_line_error
from tests.support.store import Database, database, make_result

__all__ = ["database"]  # every test here runs on both backends


def env_of(database: Database) -> dict[str, str]:
    return {
        "DEPLOYFLAG_DATABASE_URL": database.url,
        "DEPLOYFLAG_DATA_DIR": str(database.data_dir),
        "DEPLOYFLAG_AUTO_MIGRATE": "true",
    }


async def fill(database: Database) -> None:
    """Given one answered, one parked and one claimed-but-unfinished request of repo 12860."""
    settings = database.settings(auto_migrate=True)
    store = await Store.open(settings)
    try:
        await store.claim("answered", 12860)
        await store.record_result(make_result("answered", roc_auc=0.75), settings.pipeline_config())
        await store.claim("broken", 12860)
        await store.record_failure("broken", 12860, "invalid_schema", "historical_run: missing")
        await store.claim("stuck", 12860)
        await store.claim("stuck", 12860)
    finally:
        await store.close()


async def test_show_an_answered_request(database: Database) -> None:
    await fill(database)
    done = deployflag("requests", "show", "answered", "--json", env=env_of(database))
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["status"] == "done"
    assert report["attempts"] == 1
    assert report["outcome"] == "answered"
    assert report["result_stored"] is True
    assert report["repo_id"] == "12860"
    assert report["finished_at"] is not None
    assert report["model"]["trained"] is True
    assert report["model"]["roc_auc"] == pytest.approx(0.75)
    assert report["model"]["training_rows"] == 120
    text = deployflag("requests", "show", "answered", env=env_of(database))
    assert text.returncode == 0
    assert b"status    done (answered)" in text.stdout
    assert b"AUC 0.7500" in text.stdout


async def test_show_a_parked_and_a_claimed_request(database: Database) -> None:
    await fill(database)
    parked = orjson.loads(
        deployflag("requests", "show", "broken", "--json", env=env_of(database)).stdout
    )
    assert (parked["status"], parked["reason"]) == ("parked", "invalid_schema")
    assert parked["error"] == "historical_run: missing"
    assert parked["result_stored"] is False
    assert parked["model"] is None
    stuck = orjson.loads(
        deployflag("requests", "show", "stuck", "--json", env=env_of(database)).stdout
    )
    assert (stuck["status"], stuck["attempts"], stuck["finished_at"]) == ("claimed", 2, None)


async def test_park_history_survives_the_next_claim(database: Database) -> None:
    await fill(database)
    settings = database.settings(auto_migrate=True)
    store = await Store.open(settings)
    try:
        parked_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        await note_park(
            store.engine,
            request_id="broken",
            repo_id="12860",
            reason="invalid_schema",
            error="historical_run: missing",
            parked_at=parked_at,
            replay_count=1,
        )
        await store.claim("broken", 12860)  # the replayed copy arrives
    finally:
        await store.close()
    report = orjson.loads(
        deployflag("requests", "show", "broken", "--json", env=env_of(database)).stdout
    )
    assert (report["status"], report["attempts"], report["reason"]) == ("claimed", 1, None)
    assert [(p["reason"], p["parked_at"]) for p in report["parks"]] == [
        ("invalid_schema", parked_at.isoformat())
    ]


async def test_repo_lists_its_latest_requests_newest_first(database: Database) -> None:
    await fill(database)
    done = deployflag(
        "requests", "show", "--repo", "12860", "--last", "2", "--json", env=env_of(database)
    )
    assert done.returncode == 0, done.stderr
    assert [r["request_id"] for r in orjson.loads(done.stdout)] == ["stuck", "broken"]


async def test_unknown_request_is_one_line_and_exit_4(database: Database) -> None:
    await fill(database)
    done = deployflag("requests", "show", "nope", env=env_of(database))
    assert done.returncode == exitcodes.RET_NOT_FOUND
    assert "no request nope" in one_line_error(done)
    repo = deployflag("requests", "show", "--repo", "999", env=env_of(database))
    assert repo.returncode == exitcodes.RET_NOT_FOUND
    assert "no requests of repository 999" in one_line_error(repo)


def test_an_id_or_a_repo_is_required(tmp_path: object) -> None:
    done = deployflag("requests", "show")
    assert done.returncode == exitcodes.RET_USAGE
    assert "--repo" in one_line_error(done)
