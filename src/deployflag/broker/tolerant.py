"""Tolerant decoding of message properties: one bad property never kills the connection.

pamqp decodes a delivery's content header inside aiormq's frame reader. A property it cannot
decode — a short string that is not UTF-8 (``message_id``, any header key), a timestamp beyond
``datetime``'s range (2^63 − 1), headers nested deeper than Python's recursion limit — raises
there, the reader dies, the connection closes, and the broker redelivers the same message first
on the next connection: the queue is wedged, and the log only says that the connection was lost.

:func:`install` replaces pamqp's ``Basic.Properties.unmarshal`` with one that decodes property by
property. Every AMQP property has a known size on the wire (a length prefix or a fixed width), so
a property that fails is skipped exactly, left unset, and the failure is described in the
:data:`UNDECODABLE` header (added to whatever headers did decode). The service parks such a
message with that description instead of training on half of its envelope.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pamqp import commands, decode

UNDECODABLE = "x-deployflag-undecodable"
MAX_RAW_SHOWN = 512  # bytes of an undecodable property shown (escaped) in the description

_installed = False
_original_unmarshal = commands.Basic.Properties.unmarshal


def _wire_size(data: bytes, data_type: str) -> int:
    """How many bytes a property of ``data_type`` takes at the start of ``data``."""
    if data_type == "shortstr":
        return 1 + data[0]
    if data_type in ("longstr", "table"):
        return 4 + int(struct.unpack(">I", data[0:4])[0])
    if data_type in ("timestamp", "longlong"):
        return 8
    if data_type == "octet":
        return 1
    if data_type == "short":
        return 2
    if data_type == "long":
        return 4
    raise ValueError(f"no known wire size for {data_type}")


def _raw_payload(data: bytes, data_type: str, size: int) -> bytes:
    prefix = {"shortstr": 1, "longstr": 4, "table": 4}.get(data_type, 0)
    return data[prefix:size]


def _describe(name: str, exc: BaseException, raw: bytes) -> str:
    shown = raw[:MAX_RAW_SHOWN].decode("utf-8", "backslashreplace")
    more = f" … ({len(raw)} bytes)" if len(raw) > MAX_RAW_SHOWN else ""
    error = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{name}: {type(exc).__name__}: {error} (raw: {shown}{more})"


def tolerant_unmarshal(self: commands.Basic.Properties, flags: int, data: bytes) -> None:
    """pamqp's ``Basic.Properties.unmarshal``, one property at a time, skipping failures."""
    problems: list[str] = []
    for name in self.__slots__:
        if not flags & self.flags[name]:
            continue
        data_type = getattr(self.__class__, "_" + name)
        try:
            consumed, value = decode.by_type(data, data_type)
        except Exception as exc:  # RecursionError, UnicodeDecodeError, OverflowError, …
            size = _wire_size(data, data_type)  # a broken length prefix raises: as before
            problems.append(_describe(name, exc, _raw_payload(data, data_type, size)))
            consumed, value = size, None
        setattr(self, name, value)
        data = data[consumed:]
    if problems:
        headers: dict[str, Any] = dict(self.headers or {})
        headers[UNDECODABLE] = "; ".join(problems)
        self.headers = headers


def install() -> None:
    """Make pamqp decode properties tolerantly in this process (idempotent)."""
    global _installed
    if not _installed:
        commands.Basic.Properties.unmarshal = tolerant_unmarshal  # type: ignore[method-assign,assignment]
        _installed = True


def installed() -> bool:
    return _installed


def uninstall() -> None:
    """Restore pamqp's own decoder (tests)."""
    global _installed
    commands.Basic.Properties.unmarshal = _original_unmarshal  # type: ignore[method-assign]
    _installed = False


def undecodable(headers: Mapping[str, Any] | None) -> str | None:
    """The description of the properties that could not be decoded, or None."""
    value = (headers or {}).get(UNDECODABLE)
    return value if isinstance(value, str) else None
