"""What the store does with hostile values, on real SQLite and PostgreSQL: body digests tell a
reused request id apart, and a value the database refuses is bad input, not a mystery."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from deployflag.errors import InvalidRequest
from deployflag.pipeline.config import PipelineConfig
from deployflag.store import Store
from tests.support.postgres import PostgresCluster
from tests.support.store import Database, database, make_result

__all__ = ["database"]

CONFIG = PipelineConfig()


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    opened = await Store.open(database.settings(auto_migrate=True))
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_known_id_with_another_body_is_a_conflict_before_and_after_it_is_done(
    store: Store,
) -> None:
    first = await store.claim("R", 42, "a" * 64)
    assert first.status == "pending"
    other = await store.claim("R", 99, "b" * 64)
    assert other.status == "conflict"
    assert other.known_repo_id == "42"
    assert (await store.get_request("R"))["attempts"] == 1  # the other body spent nothing
    await store.record_result(make_result("R", 42), CONFIG)
    after = await store.claim("R", 99, "b" * 64)
    assert after.status == "conflict"
    assert after.result is None  # never the other body's result
    same = await store.claim("R", 42, "a" * 64)
    assert same.status == "done"
    assert same.result is not None


async def test_rows_without_a_digest_accept_any_body_and_keep_the_first_digest(
    store: Store,
) -> None:
    assert (await store.claim("old", 1, None)).status == "pending"
    assert (await store.claim("old", 1, "c" * 64)).status == "pending"
    assert (await store.get_request("old"))["body_digest"] == "c" * 64
    assert (await store.claim("old", 1, "d" * 64)).status == "conflict"


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("request_id", "repo_id"),
    [("nul\x00id", 1), ("fine", "x" * 300), ("fine", "nul\x00repo")],
    ids=["nul-in-id", "repo-id-too-long", "nul-in-repo-id"],
)
async def test_a_value_postgresql_refuses_is_bad_input(
    postgres: PostgresCluster, tmp_path: Path, request_id: str, repo_id: str | int
) -> None:
    # (SQLite stores all three: the service refuses them before the claim, on both.)
    url = postgres.fresh_database(f"t_{uuid.uuid4().hex[:16]}")
    async with await Store.open(
        Database("postgres", url, tmp_path).settings(auto_migrate=True)
    ) as store:
        await _refused(store, request_id, repo_id)


async def _refused(store: Store, request_id: str, repo_id: str | int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        await store.claim(request_id, repo_id, None)
    assert raised.value.reason == "bad_data"
    assert "the database refused a value" in raised.value.message
    # Recording the failure of such a request does not raise either: the parked copy is the record
    await store.record_failure(request_id, repo_id, "bad_data", raised.value.message)
