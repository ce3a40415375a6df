"""The per-message failure counter, header sanitising and tolerant property decoding."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from pamqp import commands, encode, header

from deployflag import poison
from deployflag.broker import tolerant
from tests.support.poison import Raw, nested_table, raw_encoding


def test_the_counter_counts_redeliveries_and_a_fresh_publish_starts_again() -> None:
    counter = poison.FailureCounter(limit=3)
    key = poison.failure_key("r", None, b"body")
    assert counter.failed(key, redelivered=False) == 1
    assert counter.failed(key, redelivered=True) == 2
    assert not counter.exhausted(2)
    assert counter.exhausted(counter.failed(key, redelivered=True))
    assert counter.failed(key, redelivered=False) == 1  # published again: not the same delivery


def test_the_key_tells_bodies_apart_under_one_id() -> None:
    assert poison.failure_key("r", None, b"a") != poison.failure_key("r", None, b"b")
    assert poison.failure_key(None, "m", b"a") == ("m", poison.body_digest_sync(b"a"))


def test_headers_pamqp_cannot_encode_become_readable_text_and_are_listed() -> None:
    huge = 2**70  # beyond any AMQP integer type
    original = {
        "n": huge,
        "s": b"\xff\xfe",
        "ok": "fine",
        "nested": {"b": b"\xff"},
        "t": [1, -huge],
    }
    with pytest.raises(TypeError, match="Unsupported numeric value"):
        encode.field_table({"n": huge})
    with pytest.raises(TypeError, match="Unknown type"):  # and has no encoder for bytes
        encode.field_table({"s": b"\xff\xfe"})
    headers = poison.encodable_headers(original, {"x-deployflag-reason": "r"})
    encode.field_table(headers)  # publishes
    assert headers["n"] == str(huge)
    assert headers["s"] == "\\xff\\xfe"
    assert headers["ok"] == "fine"
    assert headers["nested"] == {"b": "\\xff"}
    assert headers["t"] == [1, str(-huge)]
    assert headers[poison.ALTERED] == "n, s, nested.b, t[1]"
    assert headers["x-deployflag-reason"] == "r"


def test_headers_too_large_for_a_parked_copy_are_kept_as_truncated_text() -> None:
    headers = poison.encodable_headers({"big": "x" * 130_000}, {"x-deployflag-reason": "r"})
    assert "big" not in headers
    assert headers[poison.ORIGINAL].startswith("{'big': 'xxx")
    assert len(encode.field_table(headers)) < poison.MAX_PARKED_HEADER_BYTES


def _decode(properties: dict[str, object]) -> commands.Basic.Properties:
    with raw_encoding():
        data = header.ContentHeader(0, 3, commands.Basic.Properties(**properties)).marshal()
    decoded = header.ContentHeader()
    decoded.unmarshal(data)
    return decoded.properties


@pytest.fixture
def tolerant_decoding() -> Iterator[None]:
    was = tolerant.installed()
    tolerant.install()
    yield
    if not was:
        tolerant.uninstall()


@pytest.fixture
def plain_decoding() -> Iterator[None]:
    # An in-process connection earlier in the session installs the tolerant decoder for good.
    was = tolerant.installed()
    tolerant.uninstall()
    yield
    if was:
        tolerant.install()


@pytest.mark.usefixtures("plain_decoding")
def test_pamqp_alone_cannot_decode_these_properties() -> None:
    with pytest.raises(UnicodeDecodeError):
        _decode({"message_id": Raw(b"\x02\xff\xfe")})
    with pytest.raises(RecursionError):
        _decode({"headers": {"deep": nested_table(600)}})


@pytest.mark.usefixtures("tolerant_decoding")
def test_a_property_that_cannot_be_decoded_is_skipped_and_described() -> None:
    props = _decode(
        {
            "message_id": Raw(b"\x02\xff\xfe"),
            "timestamp": Raw(struct.pack(">Q", 2**63 - 1)),
            "correlation_id": "still-here",
            "headers": {"deep": nested_table(600)},
        }
    )
    assert props.message_id is None
    assert props.timestamp is None
    assert props.correlation_id == "still-here"  # the properties after a bad one still decode
    cause = tolerant.undecodable(props.headers)
    assert cause is not None
    assert "message_id: UnicodeDecodeError" in cause
    assert "timestamp:" in cause
    assert "headers: RecursionError" in cause


@pytest.mark.usefixtures("tolerant_decoding")
def test_decodable_properties_are_untouched() -> None:
    props = _decode({"message_id": "m", "headers": {"a": 1}})
    assert props.message_id == "m"
    assert props.headers == {"a": 1}
    assert tolerant.undecodable(props.headers) is None
