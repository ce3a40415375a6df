"""Poison messages as real producers (py-amqp, Java, Go) can send them, and aio-pika cannot.

aio-pika encodes through pamqp, which refuses (or cannot express) these values; so the test
publisher overrides pamqp's encoders for the fields concerned: a :class:`Raw` value is written to
the wire exactly as given. Published with aiormq directly, on a connection of their own.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiormq
from pamqp import commands, encode, frame, header

from tests.support.toolkit import Names


class Raw(bytes):
    """Bytes written as they are in place of an encoded value (table values: with the type tag;
    properties: with their length prefix)."""


@contextlib.contextmanager
def raw_encoding() -> Iterator[None]:
    """Let pamqp write :class:`Raw` values verbatim, in tables and in properties."""
    value_encoder = encode.encode_table_value
    methods = dict(encode.METHODS)

    def table_value(value: Any) -> bytes:
        return bytes(value) if isinstance(value, Raw) else value_encoder(value)

    def verbatim(original: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        return lambda value: bytes(value) if isinstance(value, Raw) else original(value)

    encode.encode_table_value = table_value  # type: ignore[assignment]
    for name in ("shortstr", "timestamp", "table", "longstr"):
        encode.METHODS[name] = verbatim(methods[name])
    try:
        yield
    finally:
        encode.encode_table_value = value_encoder
        encode.METHODS.clear()
        encode.METHODS.update(methods)


def _short(text: bytes) -> bytes:
    return struct.pack(">B", len(text)) + text


def _table(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A field table's bytes (length included) from (key, tagged value) pairs."""
    payload = b"".join(_short(key) + value for key, value in entries)
    return struct.pack(">I", len(payload)) + payload


def nested_table(depth: int) -> Raw:
    """A tagged table value nested ``depth`` levels deep: {"a": {"a": … {"a": 1}}}."""
    value = b"b" + struct.pack(">b", 1)
    for _ in range(depth):
        value = b"F" + _table([(b"a", value)])
    return Raw(value)


def largest_header_value(frame_max: int, properties: dict[str, Any]) -> int:
    """The length of a header text that makes the content header frame exactly fit."""
    low, high = 0, frame_max
    while low < high:
        mid = (low + high + 1) // 2
        props = commands.Basic.Properties(**{**properties, "headers": {"big": "x" * mid}})
        size = len(frame.marshal(header.ContentHeader(0, 10, props), 1))
        if size <= frame_max:
            low = mid
        else:
            high = mid - 1
    return low


NOT_JSON = b"this is not JSON"


@dataclass
class PoisonKind:
    """One kind of poison message: what to publish and how the service must park it.

    The kinds whose headers decode but cannot be published again carry a body that is not JSON,
    so that they are parked (the park path copies their headers); the undecodable kinds carry
    a valid request: they must be parked for their properties alone.
    """

    name: str
    reason: str
    body: bytes | None  # None: a valid request (the test supplies it)
    properties: Callable[[str], dict[str, Any]]
    request_id: str = field(default_factory=lambda: f"poison-{uuid.uuid4().hex[:8]}")


def _base(rid: str) -> dict[str, Any]:
    return {"message_id": rid, "content_type": "application/json"}


def kinds(frame_max: int = 131072) -> list[PoisonKind]:
    big = largest_header_value(frame_max, _base("poison-xxxxxxxx")) - 8
    return [
        # Decodes (as -1); pamqp 3 re-encodes it as an unsigned octet (struct.error), 4 as -1.
        PoisonKind(
            "negative_int_header",
            "not_json",
            NOT_JSON,
            lambda rid: {**_base(rid), "headers": {"n": Raw(b"I" + struct.pack(">i", -1))}},
        ),
        # Decodes to bytes, which pamqp cannot encode: TypeError.
        PoisonKind(
            "invalid_utf8_long_string_header",
            "not_json",
            NOT_JSON,
            lambda rid: {
                **_base(rid),
                "headers": {"s": Raw(b"S" + struct.pack(">I", 2) + b"\xff\xfe")},
            },
        ),
        # Fits the frame, but its parked copy (with the reasons added) would not.
        PoisonKind(
            "headers_131_kb",
            "not_json",
            NOT_JSON,
            lambda rid: {**_base(rid), "headers": {"big": "x" * big}},
        ),
        PoisonKind(
            "non_utf8_message_id",
            "undecodable_properties",
            None,
            lambda rid: {
                "message_id": Raw(_short(b"id-\xff\xfe")),
                "content_type": "application/json",
            },
        ),
        PoisonKind(
            "non_utf8_header_key",
            "undecodable_properties",
            None,
            lambda rid: {**_base(rid), "headers": Raw(_table([(b"k\xff", b"b\x01")]))},
        ),
        PoisonKind(
            "timestamp_2_63",
            "undecodable_properties",
            None,
            lambda rid: {**_base(rid), "timestamp": Raw(struct.pack(">Q", 2**63 - 1))},
        ),
        PoisonKind(
            "headers_600_deep",
            "undecodable_properties",
            None,
            lambda rid: {**_base(rid), "headers": {"deep": nested_table(600)}},
        ),
    ]


@contextlib.asynccontextmanager
async def raw_publisher(url: str, names: Names) -> Any:
    """An aiormq channel with confirms; yields ``publish(body, properties)``."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()

        async def publish(body: bytes, properties: dict[str, Any]) -> None:
            with raw_encoding():
                props = commands.Basic.Properties(delivery_mode=2, **properties)
                confirm = await channel.basic_publish(
                    body,
                    exchange=names.exchange,
                    routing_key=names.queue("training"),
                    properties=props,
                )
            assert isinstance(confirm, commands.Basic.Ack), confirm

        yield publish
    finally:
        await connection.close()
