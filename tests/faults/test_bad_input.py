"""f. Bad input of every kind is parked with its own reason, and the service keeps serving.

Each case is published alone; the test waits until it is parked, reads its reason and error from
the parked copy's headers, and checks /readyz before the next one. Afterwards a valid request is
still answered, and nothing is left in the training queue.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults.conftest import FaultTable
from tests.faults.harness import Tally
from tests.support.broker import Names, ServiceProcess

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300), pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[2]
WORKED: dict[str, Any] = orjson.loads((ROOT / "examples" / "worked-example.json").read_bytes())
TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
MAX_BYTES = 64 * 1024


def worked(change: Callable[[dict[str, Any]], None]) -> bytes:
    """The worked example with one thing broken."""
    request = copy.deepcopy(WORKED)
    change(request)
    return orjson.dumps(request)


def drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.pop(key)


def set_top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r.__setitem__(key, value)


def set_row(kind: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda r: r[kind][0].__setitem__(key, value)


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    reason: str
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = "application/json"


CASES = [
    Case("empty body", b"", "empty_body"),
    Case("not JSON", b"{nope", "not_json"),
    Case("not UTF-8", b'{"repo_id": "\xff\xfe"}', "not_utf8"),
    Case(
        "raw NaN token",
        worked(set_row("historical_run", "frequency", 1)).replace(
            b'"frequency":1,', b'"frequency":NaN,'
        ),
        "not_json",
    ),
    Case("JSON array, no Celery header", b"[1, 2, 3]", "unknown_envelope"),
    Case("top level a number", b"42", "wrong_type"),
    Case("top level a string", b'"train please"', "wrong_type"),
    Case("deeply nested JSON", b"[" * 5000 + b"]" * 5000, "too_deep"),
    Case("missing repo_id", worked(drop("repo_id")), "missing_field"),
    Case("missing historical_run", worked(drop("historical_run")), "missing_field"),
    Case("repo_id a bool", worked(set_top("repo_id", True)), "invalid_field"),
    Case("repo_id null", worked(set_top("repo_id", None)), "invalid_field"),
    Case("analysis_run not a list", worked(set_top("analysis_run", "rows")), "invalid_field"),
    Case("rows not objects", worked(set_top("historical_run", [1, 2])), "invalid_field"),
    Case("shortcode empty", worked(set_row("analysis_run", "shortcode", "")), "invalid_field"),
    Case("frequency as text", worked(set_row("historical_run", "frequency", "8")), "invalid_field"),
    Case(
        "negative frequency",
        worked(set_row("analysis_run", "frequency_detected", -3)),
        "out_of_range",
    ),
    Case("huge frequency", worked(set_row("historical_run", "frequency", 10**15)), "out_of_range"),
    # An integer past 64 bits: pydantic reads it exactly, and it is out of range.
    Case(
        "frequency past 64 bits",
        worked(set_row("analysis_run", "frequency_detected", 1)).replace(
            b'"frequency_detected":1,', b'"frequency_detected":' + b"9" * 40 + b","
        ),
        "out_of_range",
    ),
    Case(
        "timestamp not a date",
        worked(set_row("historical_run", "timestamp", "yesterday")),
        "invalid_timestamp",
    ),
    Case(
        "timestamp a number",
        worked(set_row("analysis_run", "created_at", 1612137600)),
        "invalid_timestamp",
    ),
    Case(
        "month 13",
        worked(set_row("analysis_run", "created_at", "2021-13-01T00:00:00")),
        "invalid_timestamp",
    ),
    Case(
        "pickle content type",
        b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K*.",
        "unsupported_content_type",
        content_type="application/x-python-serialize",
    ),
    Case(
        "unknown Celery task",
        b"[[{}], {}, {}]",
        "unknown_task",
        headers={"task": "evil.tasks.rm_rf", "id": "t-unknown"},
    ),
    Case(
        "Celery body an object",
        b'{"a": 1}',
        "bad_celery_body",
        headers={"task": TASK, "id": "t-object"},
    ),
    Case(
        "Celery args not a list",
        b'[{"repo_id": 1}, {}, {}]',
        "bad_celery_body",
        headers={"task": TASK, "id": "t-args"},
    ),
    Case(
        "Celery task without request",
        b"[[], {}, {}]",
        "bad_celery_body",
        headers={"task": TASK, "id": "t-empty"},
    ),
    Case(
        "Celery protocol 1, wrong task",
        b'{"task": "other.task", "id": "p1", "args": []}',
        "unknown_task",
    ),
    Case(
        "task id not text",
        b"[[{}], {}, {}]",
        "bad_request_id",
        headers={"task": TASK, "id": ["a", "list"]},
    ),
    Case(
        "task id too long",
        b"[[{}], {}, {}]",
        "bad_request_id",
        headers={"task": TASK, "id": "x" * 300},
    ),
    Case(
        "kombu uuid not a uuid",
        orjson.dumps(
            {"task": TASK, "id": {"__type__": "uuid", "__value__": {"hex": "zz"}}, "args": [WORKED]}
        ),
        "bad_request_id",
    ),
    Case("over the size limit", worked(set_top("padding", "x" * (MAX_BYTES + 1))), "too_large"),
]


async def test_every_kind_of_bad_input_is_parked_with_its_reason(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    names: Names,
    fault_table: FaultTable,
) -> None:
    assert len(CASES) >= 20
    service = start_service(
        service_env, DEPLOYFLAG_MAX_MESSAGE_BYTES=str(MAX_BYTES), DEPLOYFLAG_WORKERS="1"
    )
    errors: dict[str, str] = {}
    async with Tally(rabbit_url, names) as tally:
        for index, case in enumerate(CASES):
            message_id = f"bad-{index:02d}"
            await tally.publish(
                case.body,
                message_id=message_id,
                headers=case.headers,
                content_type=case.content_type,
            )
            await tally.settle(timeout=30, what=f"{case.name!r} to be parked")
            parked = tally.parked.get(message_id)
            assert parked is not None, f"{case.name}: answered, not parked"
            assert (case.name, parked.reason) == (case.name, case.reason), parked.error
            assert parked.error not in ("", "None"), f"{case.name}: no error text"
            errors[case.name] = parked.error
            assert service.is_ready(), f"not ready after {case.name!r}: {service.readyz()}"
        # Every error message says something of its own.
        assert len(set(errors.values())) == len(errors), errors
        # The original headers travel with the parked copy.
        assert tally.parked["bad-23"].headers["task"] == "evil.tasks.rm_rf"
        # And a valid request is still answered.
        await tally.publish(orjson.dumps(WORKED), message_id="valid-after-bad")
        await tally.settle(timeout=60, what="the valid request to be answered")
        assert "valid-after-bad" in tally.replies
        await fault_table.record(
            tally,
            f"f. bad input ({len(CASES)} kinds) + 1 valid",
            [service],
            parked=len(CASES),
            replies=1,
            rows=1,
        )
