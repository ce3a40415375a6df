"""Request schemas, validation errors, envelopes and the replies' encoding (docs/protocol.md)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from deployflag.errors import InvalidRequest
from deployflag.messages import (
    CELERY_EMBED,
    Decoded,
    ModelReport,
    Score,
    TrainingResult,
    celery_envelope_from_headers,
    decode,
    encode_celery_reply,
    encode_json_reply,
    parse_json,
    parse_request,
    reply_task_id,
    validate_request,
)

TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
ANALYSIS = {
    "repository_id": 1,
    "run_id": 7,
    "branch_name": "feature-1",
    "base_oid": None,
    "commit_oid": "c0ffee",
    "check_id": 55,
    "created_at": "2021-03-04T10:11:12.123456",
    "shortcode": "PYL-W0611",
    "frequency_detected": 12,
    "frequency_resolved": 3,
    "issue_type": "Anti-pattern",
    "severity": "major",
}
HISTORICAL = {
    "run_id": 3,
    "base_oid": "m1",
    "timestamp": "2021-02-01T00:00:00.000000",
    "shortcode": "PYL-W0611",
    "frequency": 20,
    "issue_type": "Anti-pattern",
    "severity": "major",
}
REQUEST = {"repo_id": 12860, "analysis_run": [ANALYSIS], "historical_run": [HISTORICAL]}


def payload(**changes: Any) -> dict[str, Any]:
    return {**REQUEST, **changes}


def invalid(obj: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        validate_request(obj)
    return caught.value


def decode_of(
    body: Any,
    headers: dict[str, Any] | None = None,
    *,
    message_id: str | None = None,
    content_type: str | None = "application/json",
) -> Decoded:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode(
        raw, headers or {}, message_id=message_id, content_type=content_type, task_name=TASK
    )


def decode_error(body: Any, headers: dict[str, Any] | None = None, **kw: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        decode_of(body, headers, **kw)
    return caught.value


# --- valid requests -----------------------------------------------------------------------------


def test_a_full_request_validates() -> None:
    req = validate_request(REQUEST)
    assert req.repo_id == 12860
    [row] = req.analysis_run
    assert row["created_at"] == datetime(2021, 3, 4, 10, 11, 12, 123456, tzinfo=UTC)
    assert row["base_oid"] is None
    assert req.historical_run[0]["frequency"] == 20


def test_unknown_extra_fields_are_ignored() -> None:
    req = validate_request(
        payload(
            new_top_level="x",
            analysis_run=[{**ANALYSIS, "added_later": [1, 2]}],
            historical_run=[{**HISTORICAL, "another": {"a": 1}}],
        )
    )
    assert not hasattr(req, "new_top_level")
    assert "added_later" not in req.analysis_run[0]
    assert "commit_oid" not in req.analysis_run[0]
    assert "another" not in req.historical_run[0]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-03-04T10:11:12", datetime(2021, 3, 4, 10, 11, 12, tzinfo=UTC)),  # naive is UTC
        ("2021-03-04T10:11:12.5Z", datetime(2021, 3, 4, 10, 11, 12, 500000, tzinfo=UTC)),
        ("2021-03-04T12:11:12+02:00", datetime(2021, 3, 4, 10, 11, 12, tzinfo=UTC)),
    ],
)
def test_timestamps_end_up_in_utc(text: str, expected: datetime) -> None:
    req = validate_request(payload(historical_run=[{**HISTORICAL, "timestamp": text}]))
    stamp = req.historical_run[0]["timestamp"]
    assert stamp == expected
    assert stamp.utcoffset() is not None
    assert stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_empty_lists_are_valid() -> None:
    req = validate_request({"repo_id": "repo-1", "analysis_run": [], "historical_run": []})
    assert (req.repo_id, req.analysis_run, req.historical_run) == ("repo-1", [], [])


def test_zero_frequencies_and_optional_fields() -> None:
    row = {k: v for k, v in ANALYSIS.items() if k not in ("issue_type", "severity", "base_oid")}
    req = validate_request(payload(analysis_run=[{**row, "frequency_detected": 0}]))
    assert req.analysis_run[0]["frequency_detected"] == 0
    # Absent optional fields are present as None, so the pipeline can index every row alike.
    assert req.analysis_run[0]["issue_type"] is None
    assert req.analysis_run[0]["severity"] is None
    assert req.analysis_run[0]["base_oid"] is None


def test_parse_request_reads_bytes() -> None:
    assert parse_request(orjson.dumps(REQUEST)) == validate_request(REQUEST)


def test_bytes_and_objects_give_the_same_rows() -> None:
    # The plain-JSON path validates bytes, the Celery path parsed objects: one row shape.
    sparse = {k: v for k, v in ANALYSIS.items() if k not in ("issue_type", "severity")}
    obj = payload(analysis_run=[sparse, ANALYSIS], historical_run=[HISTORICAL])
    from_bytes, from_object = parse_request(orjson.dumps(obj)), validate_request(obj)
    assert from_bytes.analysis_run == from_object.analysis_run
    assert from_bytes.historical_run == from_object.historical_run
    assert set(from_bytes.analysis_run[0]) == {
        "branch_name", "base_oid", "created_at", "shortcode", "frequency_detected",
        "issue_type", "severity",
    }  # fmt: skip


# --- invalid requests: reason code and a message naming list, row and field ---------------------


@pytest.mark.parametrize(
    ("obj", "reason", "where"),
    [
        ([REQUEST], "wrong_type", "must be a JSON object"),
        ({"analysis_run": [], "historical_run": []}, "missing_field", "repo_id: Field required"),
        ({"repo_id": 1, "historical_run": []}, "missing_field", "analysis_run: Field required"),
        ({"repo_id": 1, "analysis_run": []}, "missing_field", "historical_run: Field required"),
        (payload(analysis_run={}), "invalid_field", "analysis_run: Input should be a valid list"),
        (payload(analysis_run=[ANALYSIS, 5]), "invalid_field", "analysis_run[1]: "),
        (payload(repo_id=True), "invalid_field", "repo_id: "),
        (payload(repo_id=""), "invalid_field", "repo_id: "),
        (payload(repo_id=1.5), "invalid_field", "repo_id: "),
    ],
)
def test_invalid_request_shape(obj: Any, reason: str, where: str) -> None:
    error = invalid(obj)
    assert error.reason == reason
    assert where in error.message


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("shortcode", None, "missing_field"),
        ("branch_name", None, "invalid_field"),
        ("shortcode", "", "invalid_field"),
        ("shortcode", "x" * 201, "invalid_field"),
        ("frequency_detected", -1, "out_of_range"),
        ("frequency_detected", 10**13, "out_of_range"),
        ("frequency_detected", "5", "invalid_field"),
        ("frequency_detected", 5.0, "invalid_field"),
        ("frequency_detected", True, "invalid_field"),
        ("base_oid", 5, "invalid_field"),
        ("created_at", "yesterday", "invalid_timestamp"),
        ("created_at", "2021-02-30T00:00:00", "invalid_timestamp"),
        ("created_at", 1614852672, "invalid_timestamp"),  # epoch numbers are refused
        ("created_at", None, "invalid_timestamp"),
    ],
)
def test_invalid_analysis_row(field: str, value: Any, reason: str) -> None:
    row = dict(ANALYSIS)
    if field == "shortcode" and value is None:
        del row["shortcode"]
    else:
        row[field] = value
    error = invalid(payload(analysis_run=[ANALYSIS, ANALYSIS, row]))
    assert error.reason == reason
    assert error.message.startswith(f"analysis_run[2].{field}: ")


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("frequency", -3, "out_of_range"),
        ("frequency", None, "invalid_field"),
        ("timestamp", "2021-13-01T00:00:00", "invalid_timestamp"),
        ("timestamp", 0, "invalid_timestamp"),
        ("severity", 3, "invalid_field"),
    ],
)
def test_invalid_historical_row(field: str, value: Any, reason: str) -> None:
    error = invalid(payload(historical_run=[{**HISTORICAL, field: value}]))
    assert error.reason == reason
    assert error.message.startswith(f"historical_run[0].{field}: ")


@pytest.mark.parametrize(
    "obj",
    [
        payload(analysis_run=[ANALYSIS, {**ANALYSIS, "created_at": 1614852672}]),
        payload(historical_run=[{**HISTORICAL, "frequency": -3}]),
        payload(historical_run=[{k: v for k, v in HISTORICAL.items() if k != "shortcode"}]),
    ],
)
def test_bytes_and_objects_give_the_same_error(obj: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as from_bytes:
        parse_request(orjson.dumps(obj))
    from_object = invalid(obj)
    assert (from_bytes.value.reason, from_bytes.value.message) == (
        from_object.reason,
        from_object.message,
    )


def test_a_row_that_is_not_an_object() -> None:
    obj = payload(analysis_run=[ANALYSIS, 5])
    error = invalid(obj)
    assert (error.reason, error.message) == (
        "invalid_field",
        "analysis_run[1]: Input should be a valid dictionary",
    )
    with pytest.raises(InvalidRequest) as from_bytes:
        parse_request(orjson.dumps(obj))
    assert (from_bytes.value.reason, from_bytes.value.message) == (
        "invalid_field",
        "analysis_run[1]: Input should be an object",
    )


def test_missing_historical_field() -> None:
    row = {k: v for k, v in HISTORICAL.items() if k != "frequency"}
    error = invalid(payload(historical_run=[HISTORICAL, row]))
    assert (error.reason, error.message) == (
        "missing_field",
        "historical_run[1].frequency: Field required",
    )


def test_the_first_error_is_reported_with_a_count_of_the_rest() -> None:
    rows = [{**ANALYSIS, "frequency_detected": -1}, {**ANALYSIS, "shortcode": ""}]
    error = invalid(payload(analysis_run=rows))
    assert error.reason == "out_of_range"
    assert error.message.endswith("(and 1 more)")


def test_invalid_request_survives_pickling() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(InvalidRequest("not_json", "body is not JSON")))
    assert (error.reason, error.message) == ("not_json", "body is not JSON")


# --- JSON parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty_body"),
        (b"{", "not_json"),
        (b"not json", "not_json"),
        (b'{"a": 1} trailing', "not_json"),
        (b'"\xff\xfe"', "not_utf8"),
        (b'{"repo_id": "\xed\xa0\x80"}', "not_utf8"),
        (b"[" * 2000 + b"]" * 2000, "too_deep"),
    ],
)
def test_parse_json_failures(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_json(body)
    assert caught.value.reason == reason


def test_parse_request_rejects_non_json() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_request(b"\x00\x01")
    assert caught.value.reason == "not_json"


# --- envelopes --------------------------------------------------------------------------------


def test_plain_json_uses_the_message_id() -> None:
    decoded = decode_of(REQUEST, message_id="m-1")
    assert decoded.envelope.model_dump() == {
        "kind": "json",
        "request_id": "m-1",
        "repo_id": 12860,
        "celery_protocol": None,
        "body_digest": None,
    }
    assert decoded.request == REQUEST


def test_without_any_id_the_request_id_is_the_sha256_of_the_body() -> None:
    body = orjson.dumps(REQUEST)
    decoded = decode_of(body)
    assert decoded.envelope.request_id == hashlib.sha256(body).hexdigest()
    assert decode_of(body).envelope.request_id == decoded.envelope.request_id  # a re-sent copy


@pytest.mark.parametrize(
    "content_type", [None, "", "application/json; charset=utf-8", "text/plain"]
)
def test_json_content_types(content_type: str | None) -> None:
    assert decode_of(REQUEST, content_type=content_type).request == REQUEST


@pytest.mark.parametrize("content_type", ["application/x-python-serialize", "application/x-yaml"])
def test_wrong_content_type(content_type: str) -> None:
    assert decode_error(REQUEST, content_type=content_type).reason == "unsupported_content_type"


def test_celery_protocol_2_request_in_args() -> None:
    decoded = decode_of([[REQUEST], {}, CELERY_EMBED], {"task": TASK, "id": "t-1"})
    assert decoded.envelope.model_dump() == {
        "kind": "celery",
        "request_id": "t-1",
        "repo_id": 12860,
        "celery_protocol": 2,
        "body_digest": None,
    }
    assert decoded.request == REQUEST


def test_celery_protocol_2_request_in_kwargs_and_a_two_element_body() -> None:
    decoded = decode_of([[], {"ocave_date": REQUEST}], {"task": TASK, "id": "t-2"})
    assert (decoded.request, decoded.envelope.request_id) == (REQUEST, "t-2")


def test_celery_protocol_2_without_an_id_falls_back() -> None:
    body = orjson.dumps([[REQUEST], {}, CELERY_EMBED])
    assert decode_of(body, {"task": TASK}, message_id="m-9").envelope.request_id == "m-9"
    assert decode_of(body, {"task": TASK}).envelope.request_id == hashlib.sha256(body).hexdigest()


def test_kombu_uuid_form_of_the_task_id() -> None:
    task_id = uuid.uuid4()
    kombu_id = {"__type__": "uuid", "__value__": {"hex": task_id.hex}}
    decoded = decode_of([[REQUEST], {}, CELERY_EMBED], {"task": TASK, "id": kombu_id})
    assert decoded.envelope.request_id == str(task_id)
    plain = {"__type__": "uuid", "__value__": task_id.hex}
    decoded = decode_of([[REQUEST], {}, CELERY_EMBED], {"task": TASK, "id": plain})
    assert decoded.envelope.request_id == str(task_id)


@pytest.mark.parametrize(
    "task_id",
    [
        {"__type__": "uuid", "__value__": {"hex": "not-a-uuid"}},
        "x" * 256,
        ["a", "list"],
        {"some": "object"},
    ],
)
def test_bad_task_ids(task_id: Any) -> None:
    error = decode_error([[REQUEST], {}, CELERY_EMBED], {"task": TASK, "id": task_id})
    assert error.reason == "bad_request_id"


def test_numeric_and_bytes_ids_become_text() -> None:
    assert decode_of([[REQUEST], {}, {}], {"task": TASK, "id": 42}).envelope.request_id == "42"
    headers = {"task": TASK, "id": b"t-b"}
    assert decode_of([[REQUEST], {}, {}], headers).envelope.request_id == "t-b"


def test_celery_protocol_1() -> None:
    body = {"task": TASK, "id": "t-3", "args": [REQUEST], "kwargs": {}}
    decoded = decode_of(body)
    assert decoded.envelope.kind == "celery"
    assert decoded.envelope.celery_protocol == 1
    assert (decoded.envelope.request_id, decoded.request) == ("t-3", REQUEST)
    body = {"task": TASK, "id": "t-4", "args": [], "kwargs": {"ocave_date": REQUEST}}
    assert decode_of(body).request == REQUEST


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ([[REQUEST], {}, CELERY_EMBED], {"task": "some.other.task", "id": "t"}),
        ({"task": "some.other.task", "id": "t", "args": [REQUEST], "kwargs": {}}, {}),
    ],
)
def test_unknown_task(body: Any, headers: dict[str, Any]) -> None:
    assert decode_error(body, headers).reason == "unknown_task"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ({"not": "a list"}, {"task": TASK}),
        ([[REQUEST]], {"task": TASK}),
        ([[REQUEST], {}, {}, {}], {"task": TASK}),
        (["args", {}, {}], {"task": TASK}),
        ([[], {}, {}], {"task": TASK}),
        ([[], {"other": 1}, {}], {"task": TASK}),
        ({"task": TASK, "id": "t", "args": {}, "kwargs": {}}, {}),
    ],
)
def test_bad_celery_body(body: Any, headers: dict[str, Any]) -> None:
    assert decode_error(body, headers).reason == "bad_celery_body"


def test_unknown_envelope() -> None:
    assert decode_error([REQUEST]).reason == "unknown_envelope"


@pytest.mark.parametrize("body", [5, "text", None, True])
def test_a_json_scalar_is_the_wrong_type(body: Any) -> None:
    assert decode_error(body).reason == "wrong_type"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty_body"),
        (b"\xff", "not_utf8"),
        (b"{oops", "not_json"),
        (b"[" * 1100 + b"]" * 1100, "too_deep"),
    ],
)
def test_decode_bad_bodies(body: bytes, reason: str) -> None:
    assert decode_error(body).reason == reason


def test_repo_id_of_the_envelope_is_only_taken_when_it_is_an_id() -> None:
    assert decode_of(payload(repo_id="r-7")).envelope.repo_id == "r-7"
    assert decode_of(payload(repo_id=True)).envelope.repo_id is None
    assert decode_of(payload(repo_id=[1])).envelope.repo_id is None
    assert decode_of({"no": "repo"}).envelope.repo_id is None


# --- identifying a Celery protocol-2 message from its headers alone ---------------------------

KOMBU_UUID = {"__type__": "uuid", "__value__": "2b7e4a6c-5d1f-4c1e-9a0b-3f2d8e6c7a91"}


@pytest.mark.parametrize("task_id", ["task-1", 17, KOMBU_UUID])
def test_headers_of_a_protocol_2_task_give_the_same_request_id_as_the_body(task_id: Any) -> None:
    headers = {"task": TASK, "id": task_id}
    from_headers = celery_envelope_from_headers(headers, "application/json", TASK)
    from_body = decode_of([[REQUEST], {}, CELERY_EMBED], headers).envelope
    assert from_headers is not None
    assert from_headers.request_id == from_body.request_id
    assert (from_headers.kind, from_headers.celery_protocol) == ("celery", 2)
    assert from_headers.repo_id is None  # only the body has it


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({}, "application/json"),  # plain JSON or protocol 1: only the body tells
        ({"task": "evil.task", "id": "t1"}, "application/json"),
        ({"task": TASK}, "application/json"),
        ({"task": TASK, "id": ""}, "application/json"),
        ({"task": TASK, "id": {"__type__": "uuid", "__value__": "nope"}}, "application/json"),
        ({"task": TASK, "id": "t1"}, "application/x-python-serialize"),
    ],
)
def test_headers_that_do_not_settle_the_envelope_leave_it_to_the_body(
    headers: dict[str, Any], content_type: str
) -> None:
    assert celery_envelope_from_headers(headers, content_type, TASK) is None


# --- replies ----------------------------------------------------------------------------------


def result() -> TrainingResult:
    return TrainingResult(
        request_id="req-1",
        repo_id=12860,
        scores=[
            Score(
                issue_shortcode="PYL-W0611",
                issue_weight=41,
                fix_probability=0.0,
                daily_weighted_fix_rate=0.5714,
                historical_weighted_fix_rate=0.4,
                severity_score=60,
            )
        ],
        model=ModelReport(trained=False, skipped_reason="one_class", estimator="HGB"),
        deployflag_version="2.0.0",
        finished_at=datetime(2021, 1, 1, tzinfo=UTC),
    )


def test_json_reply() -> None:
    reply = encode_json_reply(result())
    body = orjson.loads(reply.body)
    assert body["status"] == "ok"
    assert body["request_id"] == "req-1"
    assert body["scores"][0]["issue_weight"] == 41
    assert reply.content_type == "application/json"


def test_celery_reply_is_a_full_protocol_2_message() -> None:
    reply = encode_celery_reply(result(), "contrib.deployflag.tasks.store", "deployflag@host")
    args, kwargs, embed = orjson.loads(reply.body)
    assert args == []
    assert kwargs == {
        "deployflag_results": [{"issue_shortcode": "PYL-W0611", "issue_weight": 41}],
        "repo_id": 12860,
    }
    assert embed == CELERY_EMBED
    assert reply.headers["task"] == "contrib.deployflag.tasks.store"
    assert reply.headers["id"] == reply_task_id("req-1") == reply.headers["root_id"]
    assert reply.content_type == "application/json"
    assert reply_task_id("req-1") == reply_task_id("req-1") != reply_task_id("req-2")


def test_an_empty_bytes_task_id_is_no_id_on_both_paths() -> None:
    # Found by the fuzzer: b"" passed the emptiness check before it was decoded, so the header
    # path gave a large Celery message the request id "" (every such message the same request).
    from deployflag.messages import celery_envelope_from_headers, decode

    task = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
    headers = {"task": task, "id": b""}
    body = b'[[{"repo_id": 1}], {}, {}]'
    assert celery_envelope_from_headers(headers, "application/json", task) is None
    decoded = decode(
        body, headers, message_id=None, content_type="application/json", task_name=task
    )
    assert decoded.envelope.request_id == hashlib.sha256(body).hexdigest()
