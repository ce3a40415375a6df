"""The pure parts of the failed-queue commands: durations, what a parked body says, selections."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from deployflag.parked import Parked, Selection, _peek, counts_by_reason, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [("30s", timedelta(seconds=30)), ("15m", timedelta(minutes=15)), ("12h", timedelta(hours=12)),
     ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), ("1.5h", timedelta(minutes=90))],
)  # fmt: skip
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7 days", "-1d", "soon"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_peek_reads_the_kind_and_repo_of_each_envelope() -> None:
    request = {"repo_id": 7, "analysis_run": [], "historical_run": []}
    assert _peek(orjson.dumps(request), {}) == ("json", "7")
    celery2 = orjson.dumps([[request], {}, {}])
    assert _peek(celery2, {"task": "t", "id": "x"}) == ("celery", "7")
    celery1 = orjson.dumps({"task": "t", "id": "x", "args": [request], "kwargs": {}})
    assert _peek(celery1, {}) == ("celery-v1", "7")
    assert _peek(b"{nope", {}) == ("not-json", None)
    assert _peek(b"[1, 2]", {}) == ("json", None)


def parked(reason: str, request_id: str | None, age: timedelta | None) -> Parked:
    when = None if age is None else datetime.now(UTC) - age
    message: Any = None
    return Parked(message, request_id, None, reason, "", 0, "json", when, 0)


def test_selection_by_reason_id_and_age() -> None:
    old = parked("too_large", "a", timedelta(days=8))
    new = parked("too_large", "b", timedelta(hours=1))
    other = parked("not_json", "c", timedelta(days=8))
    undated = parked("not_json", "d", None)
    everything = [old, new, other, undated]
    assert [p.request_id for p in everything if Selection()(p)] == ["a", "b", "c", "d"]
    by_reason = Selection(reasons=frozenset({"too_large"}))
    assert [p.request_id for p in everything if by_reason(p)] == ["a", "b"]
    by_id = Selection(request_ids=frozenset({"c"}))
    assert [p.request_id for p in everything if by_id(p)] == ["c"]
    old_only = Selection(older_than=timedelta(days=7))
    assert [p.request_id for p in everything if old_only(p)] == ["a", "c"]  # undated: never
    assert counts_by_reason(everything) == [("not_json", 2), ("too_large", 2)]
