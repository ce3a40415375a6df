"""Hypothesis strategies for whatever can arrive on the training queue, and the decoder's contract.

The contract: for any body, content type, message id and header table, the decoding steps the
service runs (``messages.decode`` and the request validation after it, the header-only path for
large Celery messages, ``worker.identify``) either return a request/envelope or raise
:class:`InvalidRequest` — nothing else escapes — and they agree with each other.

Header values are the types an AMQP field table can carry (text, bytes, 64-bit integers, floats,
booleans, decimals, timestamps, nulls, arrays and nested tables), including the wrong ones for
``task``, ``id`` and ``argsrepr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from typing import Any

import orjson
import pytest
from hypothesis import strategies as st

from deployflag.errors import InvalidRequest
from deployflag.messages import (
    Decoded,
    Envelope,
    TrainingRequest,
    celery_envelope_from_headers,
    decode,
    parse_request,
    validate_request,
)
from deployflag.worker import Job, identify

TASK = "deployflag.contrib.ocave.tasks.process_data_from_ocave"
INT64 = st.integers(-(2**63), 2**63 - 1)

# --- header tables ---------------------------------------------------------------------------

scalar_values = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.decimals(
        allow_nan=False, allow_infinity=False, places=3, max_value=10**9, min_value=-(10**9)
    ),
    st.datetimes(timezones=st.just(UTC)),
)
header_values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
uuid_forms = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: {"__type__": "uuid", "__value__": u.hex}),
    st.uuids().map(lambda u: {"__type__": "uuid", "__value__": {"hex": u.hex}}),
    st.just({"__type__": "uuid", "__value__": "not-a-uuid"}),
    st.just({"__type__": "uuid", "__value__": None}),
)


class Huge(str):
    """A long header string that hypothesis can show in a report without pages of x."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} characters>"


huge_text = st.integers(256, 300_000).map(lambda n: Huge("x" * n))
task_values = st.one_of(st.just(TASK), st.just(TASK.encode()), header_values, huge_text)
id_values = st.one_of(uuid_forms, header_values, huge_text, st.text(min_size=1, max_size=255))


@st.composite
def header_tables(draw: st.DrawFn) -> dict[str, Any]:
    table: dict[str, Any] = draw(st.dictionaries(st.text(max_size=12), header_values, max_size=5))
    if draw(st.booleans()):
        table["task"] = draw(task_values)
    if draw(st.booleans()):
        table["id"] = draw(id_values)
    if draw(st.booleans()):
        table["argsrepr"] = draw(st.one_of(header_values, huge_text))
    if draw(st.booleans()):
        table["lang"] = draw(st.one_of(st.just("py"), header_values))
    return table


# --- bodies ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=25,
)
timestamps = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat()),
    st.just("2021-03-01T10:00:00Z"),
    json_values,
)


def _row(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {
        "shortcode": st.one_of(st.sampled_from(["PYL-W0611", "PTC-W0004"]), json_values),
        "issue_type": st.one_of(st.none(), st.text(max_size=10), json_values),
        "severity": st.one_of(st.none(), st.sampled_from(["critical", "major"]), json_values),
    }
    if kind == "analysis":
        fields |= {
            "branch_name": st.one_of(st.sampled_from(["master", "dev"]), json_values),
            "created_at": timestamps,
            "frequency_detected": st.one_of(st.integers(0, 50), json_values),
        }
    else:
        fields |= {"timestamp": timestamps, "frequency": st.one_of(st.integers(0, 50), json_values)}
    return st.fixed_dictionaries({}, optional=fields)


requests = st.fixed_dictionaries(
    {},
    optional={
        "repo_id": st.one_of(INT64, st.text(max_size=300), json_values),
        "default_branch_name": st.one_of(st.none(), st.text(max_size=20), json_values),
        "analysis_run": st.one_of(st.lists(_row("analysis"), max_size=4), json_values),
        "historical_run": st.one_of(st.lists(_row("historical"), max_size=4), json_values),
    },
)
envelopes = st.one_of(
    requests,  # plain JSON
    st.tuples(  # Celery protocol 2: [args, kwargs, embed]
        st.one_of(st.lists(requests, max_size=2), json_values),
        st.one_of(st.fixed_dictionaries({}, optional={"ocave_date": requests}), json_values),
        json_values,
    ).map(list),
    st.fixed_dictionaries(  # Celery protocol 1: everything in the body
        {"task": st.one_of(st.just(TASK), json_values, huge_text)},
        optional={
            "id": st.one_of(uuid_forms, json_values),
            "args": st.one_of(st.lists(requests, max_size=2), json_values),
            "kwargs": st.one_of(st.dictionaries(st.text(max_size=5), requests), json_values),
        },
    ),
    json_values,
)


def _dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _mangle(body: bytes, at: int, junk: bytes) -> bytes:
    at = at % (len(body) + 1)
    return body[:at] + junk + body[at:]


bodies = st.one_of(
    envelopes.map(_dumps),
    st.binary(max_size=200),
    st.tuples(
        envelopes.map(_dumps),
        st.integers(0, 10**6),
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"}", b"[" * 3, b'"']),
    ).map(lambda t: _mangle(*t)),  # non-UTF-8, truncated, broken
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b""),
)
content_types = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "APPLICATION/JSON ; charset=latin-1",
            "text/json",
            "text/plain",
            "",
            "application/x-python-serialize",
            "application/x-yaml",
            ";",
        ]
    ),
    st.none(),
    st.text(max_size=60),
)
message_ids = st.one_of(st.none(), st.text(max_size=300), st.uuids().map(str))


# --- the contract ----------------------------------------------------------------------------


def check_contract(
    body: bytes, headers: Mapping[str, Any], content_type: str | None, message_id: str | None
) -> str:
    """Run every decoding step on one delivery; returns the outcome (for hypothesis.event)."""
    # The header-only path never raises: an envelope, or "let decode decide".
    headed = celery_envelope_from_headers(headers, content_type, TASK)
    assert headed is None or isinstance(headed, Envelope)

    rejection: InvalidRequest | None = None
    try:
        decoded: Decoded | None = decode(
            body, headers, message_id=message_id, content_type=content_type, task_name=TASK
        )
    except InvalidRequest as exc:
        rejection, decoded = exc, None
    if rejection is not None:
        assert isinstance(rejection.reason, str)
        assert rejection.reason
        assert isinstance(rejection.message, str)
        outcome = f"rejected:{rejection.reason}"
    else:
        assert decoded is not None
        assert isinstance(decoded, Decoded)
        envelope = decoded.envelope
        assert isinstance(envelope.request_id, str)
        assert envelope.request_id
        if headed is not None:  # the two paths agree on what they both recognise
            assert (envelope.kind, envelope.celery_protocol) == ("celery", 2)
            assert envelope.request_id == headed.request_id
        try:
            request = (
                parse_request(body)
                if envelope.kind == "json"
                else validate_request(decoded.request)
            )
        except InvalidRequest as exc:
            outcome = f"invalid:{exc.reason}"
        else:
            assert isinstance(request, TrainingRequest)
            outcome = f"request:{envelope.kind}"

    # What the service runs for a small delivery: an envelope, or the reason to park it.
    job = Job(body=body, headers=headers, message_id=message_id, content_type=content_type)
    if decoded is None:
        with pytest.raises(InvalidRequest) as refused:
            identify(job, TASK)
        assert refused.value.request_id  # parked under the best id there is
    else:
        assert identify(job, TASK) == decoded.envelope
    return outcome
