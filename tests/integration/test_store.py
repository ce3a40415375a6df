"""The Store's queries on real SQLite and PostgreSQL: de-duplication, attempts, versioned rows,
and the original's debugging queries (docs/database.md)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import multiprocessing
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import pytest
from sqlalchemy import text

from deployflag.pipeline.config import ModelSpec, PipelineConfig
from deployflag.store import Claim, Store
from deployflag.store.tables import ModelPerformanceMetadata
from tests.support.store import FINISHED_AT, Database, database, make_result, record_many

__all__ = ["database"]  # the fixture, imported so that every test here runs on both backends

CONFIG = PipelineConfig(scoring="seed")  # make_result's results are the seed scoring's


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    opened = await Store.open(database.settings(auto_migrate=True))
    try:
        yield opened
    finally:
        await opened.close()


async def query(store: Store, sql: str) -> list[dict[str, Any]]:
    async with store.engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(text(sql))).mappings()]


async def count(store: Store, table: str) -> int:
    rows = await query(store, f"SELECT count(*) AS n FROM {table}")
    return int(rows[0]["n"])


# --- claim ---------------------------------------------------------------------------------


async def test_claim_counts_attempts(store: Store) -> None:
    assert await store.claim("req-1", 12860) == Claim(status="pending", attempts=1)
    assert await store.claim("req-1", 12860) == Claim(status="pending", attempts=2)
    row = await store.get_request("req-1")
    assert row is not None
    assert (row["status"], row["attempts"], row["repo_id"]) == ("pending", 2, "12860")


async def test_concurrent_claims_count_every_attempt(store: Store) -> None:
    claims = await asyncio.gather(*(store.claim("busy", "repo-a") for _ in range(20)))
    assert sorted(c.attempts for c in claims) == list(range(1, 21))
    row = await store.get_request("busy")
    assert row is not None
    assert row["attempts"] == 20
    assert await count(store, "training_request") == 1


async def test_claim_of_a_done_request_returns_its_result(store: Store) -> None:
    await store.claim("req-2", 1)
    fresh, stored = await store.record_result(make_result("req-2", 1), CONFIG)
    assert fresh
    claim = await store.claim("req-2", 1)
    assert claim == Claim(status="done", attempts=1, result=stored)
    assert claim.result is not None
    assert claim.result["request_id"] == "req-2"
    assert claim.result["scores"][0]["issue_weight"] == 41


async def test_claim_of_a_parked_request_is_a_fresh_redrive(store: Store) -> None:
    for _ in range(3):
        await store.claim("req-3", None)
    await store.record_failure("req-3", None, "max_attempts", "worker died 3 times")
    claim = await store.claim("req-3", 7)
    assert claim == Claim(status="pending", attempts=1)
    row = await store.get_request("req-3")
    assert row is not None
    assert (row["status"], row["reason"], row["error"], row["finished_at"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert row["repo_id"] == "7"


# --- record_result ---------------------------------------------------------------------------


async def test_record_result_writes_versioned_rows_and_metadata(store: Store) -> None:
    await store.claim("req-4", 12860)
    fresh, result_json = await store.record_result(make_result("req-4"), CONFIG)
    assert fresh
    assert result_json == make_result("req-4").model_dump(mode="json")

    [framework] = await query(store, "SELECT * FROM model_framework")
    sklearn = importlib.metadata.version("scikit-learn")
    assert framework["version"] == f"HistGradientBoostingClassifier:{sklearn}"
    assert (framework["model_name"], framework["model_version"]) == (
        "HistGradientBoostingClassifier",
        sklearn,
    )
    row = await store.get_request("req-4")
    assert row is not None
    assert (row["status"], row["attempts"], row["result"]) == ("done", 1, result_json)
    assert row["finished_at"] is not None
    assert row["finished_at"].tzinfo is UTC
    assert row["received_at"].tzinfo is UTC


async def test_the_metadata_row_records_the_scoring_half_life_and_blend(store: Store) -> None:
    # Given a forecast result with a 60-day half-life and a 0.2 blend
    seed = make_result("seed-row")
    base = make_result("forecast-row", estimator="LogisticRegression")
    model = base.model.model_copy(update={"half_life_days": 60.0, "blend_weight": 0.2})
    forecast = base.model_copy(update={"scoring": "forecast", "model": model})
    # When both are recorded, each under its own scoring's configuration
    await store.record_result(seed, CONFIG)
    await store.record_result(forecast, PipelineConfig())
    # Then each metadata row says which scoring produced it
    rows = await query(
        store,
        "SELECT m.request_id, m.scoring, m.half_life_days, m.blend_weight, g.parameters "
        "FROM model_performance_metadata m JOIN grid_search_parameter g "
        "ON g.id = m.grid_search_model_parameters_id ORDER BY m.request_id",
    )
    assert [
        (r["request_id"], r["scoring"], r["half_life_days"], r["blend_weight"]) for r in rows
    ] == [
        ("forecast-row", "forecast", 60.0, 0.2),
        ("seed-row", "seed", None, None),
    ]
    # And the forecast row points at the logistic regression's definition
    assert '"LogisticRegression"' in rows[0]["parameters"]


async def test_original_debugging_queries_show_the_rows(store: Store, database: Database) -> None:
    await store.record_result(make_result("req-5", roc_auc=None, precision=None), CONFIG)

    [grid] = await query(store, "SELECT * FROM grid_search_parameter;")
    assert grid["version"] == CONFIG.model.grid_version
    assert (grid["objective"], grid["eval_metric"]) == ("binary:log_loss", "roc_auc")
    assert '"cv_folds": 2' in grid["parameters"]  # JSON text, readable as it is

    [meta] = await query(store, "SELECT * FROM model_performance_metadata;")
    assert meta["repo_id"] == "12860"
    assert meta["request_id"] == "req-5"
    assert meta["precision_score"] is None
    assert meta["roc_auc"] is None
    assert meta["training_time"] == pytest.approx(0.42)
    assert meta["number_of_training_data_rows"] == 120
    assert (
        meta["w1_daily_weighted_fix_rate"],
        meta["w2_historical_weighted_fix_rate"],
        meta["w3_fix_probability"],
        meta["w4_severity"],
    ) == (0.3, 0.3, 0.2, 0.2)
    assert meta["grid_search_model_parameters_id"] == grid["id"]
    assert meta["deployflag_version"] == "2.0.0"

    [joined] = await query(
        store,
        "SELECT f.version AS framework, g.version AS grid FROM model_performance_metadata m "
        "JOIN model_framework f ON f.id = m.model_framework_id "
        "JOIN grid_search_parameter g ON g.id = m.grid_search_model_parameters_id",
    )
    assert joined["grid"] == CONFIG.model.grid_version
    assert joined["framework"].startswith("HistGradientBoostingClassifier:")

    if database.kind == "sqlite":  # the documented stdlib variant, on the file itself

        def read() -> list[tuple[Any, ...]]:
            with sqlite3.connect(database.data_dir / "deployflag.db") as conn:
                return conn.execute(
                    "SELECT request_id, last_training FROM model_performance_metadata"
                ).fetchall()

        [(request_id, last_training)] = await asyncio.to_thread(read)
        assert request_id == "req-5"
        assert last_training.startswith("2021-03-04 10:11:12")


async def test_recording_a_request_twice_keeps_one_row(store: Store) -> None:
    await store.claim("req-6", 1)
    first = await store.record_result(make_result("req-6", 1), CONFIG)
    second = await store.record_result(make_result("req-6", 1, roc_auc=0.1), CONFIG)
    assert first[0] is True
    assert second == (False, first[1])  # the stored result, not the new one
    assert await count(store, "training_request") == 1
    assert await count(store, "model_performance_metadata") == 1
    [meta] = await query(store, "SELECT roc_auc, last_training FROM model_performance_metadata")
    assert meta["roc_auc"] == 0.75


async def test_concurrent_copies_of_one_request_finish_it_once(store: Store) -> None:
    await store.claim("dup", 1)
    outcomes = await asyncio.gather(
        *(store.record_result(make_result("dup", 1), CONFIG) for _ in range(10))
    )
    assert sum(fresh for fresh, _ in outcomes) == 1
    assert all(stored == outcomes[0][1] for _, stored in outcomes)
    assert await count(store, "model_performance_metadata") == 1


async def test_record_result_without_a_claim(store: Store) -> None:
    """The offline ``run --store`` path: the request row is created as done."""
    fresh, _ = await store.record_result(make_result("offline", "repo-x"), CONFIG)
    assert fresh
    row = await store.get_request("offline")
    assert row is not None
    assert (row["status"], row["attempts"], row["repo_id"]) == ("done", 1, "repo-x")


async def test_a_parked_request_can_still_finish(store: Store) -> None:
    await store.record_failure("late", 1, "job_timeout", "too slow")
    fresh, _ = await store.record_result(make_result("late", 1), CONFIG)
    assert fresh
    row = await store.get_request("late")
    assert row is not None
    assert (row["status"], row["reason"], row["error"]) == ("done", None, None)


async def test_new_versions_get_new_rows(store: Store) -> None:
    other = PipelineConfig(scoring="seed", model=ModelSpec(param_grid={"max_depth": [3, 5]}))
    await store.record_result(make_result("v1"), CONFIG)
    await store.record_result(make_result("v2"), other)
    await store.record_result(make_result("v3", estimator="OtherClassifier"), other)
    await store.record_result(make_result("v4"), CONFIG)
    assert await count(store, "grid_search_parameter") == 2
    assert await count(store, "model_framework") == 2
    assert await count(store, "model_performance_metadata") == 4


async def test_timestamps_are_utc(store: Store) -> None:
    await store.record_result(make_result("tz"), CONFIG)
    table = ModelPerformanceMetadata.__table__
    async with store.engine.connect() as conn:
        row = (await conn.execute(table.select().where(table.c.request_id == "tz"))).one()
    assert row.last_training == FINISHED_AT
    assert row.last_training.tzinfo is UTC
    assert row.created_at.tzinfo is UTC


# --- record_failure --------------------------------------------------------------------------


async def test_record_failure_parks_with_reason(store: Store) -> None:
    await store.claim("bad", 3)
    await store.record_failure(
        "bad", 3, "invalid_field" + "x" * 100, "see postgresql://u:hunter22@db/x"
    )
    row = await store.get_request("bad")
    assert row is not None
    assert row["status"] == "parked"
    assert row["reason"] == ("invalid_field" + "x" * 100)[:64]
    assert "hunter22" not in row["error"]
    assert row["attempts"] == 1


async def test_record_failure_never_overwrites_done(store: Store) -> None:
    _, stored = await store.record_result(make_result("finished"), CONFIG)
    await store.record_failure("finished", 12860, "reply_unroutable", "late failure")
    row = await store.get_request("finished")
    assert row is not None
    assert (row["status"], row["reason"], row["error"], row["result"]) == (
        "done",
        None,
        None,
        stored,
    )


async def test_unknown_request_is_none(store: Store) -> None:
    assert await store.get_request("nope") is None


# --- many processes ----------------------------------------------------------------------------


async def test_two_processes_record_concurrently(database: Database) -> None:
    """2 processes × 50 concurrent record_result calls on a fresh database (both also migrate at
    once): no error, one row per version, one metadata row per request."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=record_many, args=(database.url, prefix, 50, barrier, results))
        for prefix in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = dict([await asyncio.to_thread(results.get, timeout=120) for _ in workers])
    finally:
        for worker in workers:
            await asyncio.to_thread(worker.join, 30)
            if worker.is_alive():
                worker.kill()
    results.close()
    results.join_thread()
    assert outcomes == {"a": ["True"] * 50, "b": ["True"] * 50}
    assert [w.exitcode for w in workers] == [0, 0]

    async with await Store.open(database.settings()) as store:
        assert await count(store, "model_framework") == 1
        assert await count(store, "grid_search_parameter") == 1
        assert await count(store, "model_performance_metadata") == 100
        rows = await query(store, "SELECT status, count(*) AS n FROM training_request GROUP BY 1")
        assert rows == [{"status": "done", "n": 100}]


async def test_claim_and_record_in_one_write_matches_claim_then_record(store: Store) -> None:
    folded = await store.claim_and_record(make_result("one-write"), CONFIG, "d1", 3)
    await store.claim("two-writes", 12860, "d1")
    fresh, stored = await store.record_result(make_result("two-writes"), CONFIG)
    assert folded.recorded
    assert fresh
    assert folded.claim == Claim(status="pending", attempts=1)
    rows = [await store.get_request(rid) for rid in ("one-write", "two-writes")]
    assert rows[0] is not None
    assert rows[1] is not None
    keys = ("status", "attempts", "body_digest", "repo_id")
    assert [rows[0][k] for k in keys] == [rows[1][k] for k in keys] == ["done", 1, "d1", "12860"]
    assert {**rows[0]["result"], "request_id": "x"} == {**stored, "request_id": "x"}
    assert await count(store, "model_performance_metadata") == 2
    done = await store.claim_and_record(make_result("one-write"), CONFIG, "d1", 3)
    assert (done.claim.status, done.recorded) == ("done", False)
    assert await count(store, "model_performance_metadata") == 2
