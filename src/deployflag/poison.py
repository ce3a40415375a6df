"""Poison messages: bound what one delivery can cost, whatever it carries.

* :class:`FailureCounter` counts the unexpected failures (a bug, anything the flow does not
  classify) of one message across its redeliveries, so the catch-all parks it as
  ``internal_error`` after a few instead of requeueing it for ever.
* :class:`Unrecorded` is a rejection parked without writing the request's row: the row belongs to
  another body (:func:`id_conflict`), or writing it is what failed.
* :func:`encodable_headers` turns the headers a message arrived with into headers that can be
  published again: pamqp decodes values it cannot encode (an invalid UTF-8 long string decodes to
  ``bytes``; a signed 8-bit negative integer is re-encoded as an unsigned octet and fails), and a
  parked copy of headers close to the frame size would no longer fit once the reasons are added.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import decimal
import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from pamqp import encode

from deployflag.errors import InvalidRequest
from deployflag.messages import Envelope

MAX_UNEXPECTED_FAILURES = 3  # unexpected failures of one message before it is parked
_REMEMBERED = 10_000  # messages whose failures are counted at once (oldest forgotten first)
# The parked copy's headers must fit one content-header frame (frame_max, 128 KiB by default)
# together with the other properties: past this the original headers are kept as text instead.
MAX_PARKED_HEADER_BYTES = 64 * 1024
MAX_ORIGINAL_TEXT = 16 * 1024
MAX_DEPTH = 32  # nesting kept in the parked copy's headers; deeper levels become text
ALTERED = "x-deployflag-altered-headers"
ORIGINAL = "x-deployflag-original-headers"
INLINE_DIGEST_BYTES = 64 * 1024


def body_digest_sync(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def body_digest(body: bytes) -> str:
    """SHA-256 of the body, hex; large bodies are hashed off the event loop."""
    if len(body) <= INLINE_DIGEST_BYTES:
        return body_digest_sync(body)
    return await asyncio.to_thread(body_digest_sync, body)


class FailureCounter:
    """Unexpected failures per message, keyed by its request id (or message id) and body.

    A first delivery (``redelivered`` false) starts the count again: it is a new publish (an
    upstream re-sending a message, or an operator re-driving a parked one), not the same
    delivery coming back.
    """

    def __init__(self, limit: int = MAX_UNEXPECTED_FAILURES) -> None:
        self.limit = limit
        self._counts: OrderedDict[tuple[str, str], int] = OrderedDict()

    def failed(self, key: tuple[str, str], *, redelivered: bool) -> int:
        """Count one failure; returns how many this message has had."""
        count = self._counts.pop(key, 0) + 1 if redelivered else 1
        self._counts[key] = count
        while len(self._counts) > _REMEMBERED:
            self._counts.popitem(last=False)
        return count

    def exhausted(self, count: int) -> bool:
        return count >= self.limit

    def forget(self, key: tuple[str, str]) -> None:
        self._counts.pop(key, None)


def failure_key(request_id: str | None, message_id: str | None, body: bytes) -> tuple[str, str]:
    return (request_id or message_id or "", body_digest_sync(body))


class Unrecorded(InvalidRequest):
    """Parked (the copy names the request) without writing the request's row."""


def internal_error(
    exc: BaseException, count: int, request_id: str | None, repo_id: int | str | None
) -> InvalidRequest:
    """The rejection of a message that failed unexpectedly ``count`` times."""
    error = f"{type(exc).__name__}: {exc} (failed unexpectedly {count} times)"
    return InvalidRequest("internal_error", error, request_id, repo_id)


def unrecorded(rejection: InvalidRequest) -> Unrecorded:
    """The same rejection, parked without the database (when recording it is what fails)."""
    return Unrecorded(rejection.reason, rejection.message, rejection.request_id, rejection.repo_id)


def id_conflict(envelope: Envelope, known_repo_id: str | None) -> Unrecorded:
    """A known request id with another body: parked, never answered with the other's result.
    Not recorded: the row belongs to the first body."""
    return Unrecorded(
        "id_conflict",
        f"request id {envelope.request_id!r} is already known with another body (stored for "
        f"repo {known_repo_id!r}); this message is for repo {envelope.repo_id!r}, body "
        f"sha256 {envelope.body_digest}",
        envelope.request_id,
        envelope.repo_id,
    )


def _encodes(value: Any) -> bool:
    try:
        encode.encode_table_value(value)
    except (TypeError, ValueError, OverflowError, RecursionError, ArithmeticError):
        return False
    except Exception:  # struct.error and whatever else the encoder raises
        return False
    return True


def _readable(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


def _clean(value: Any, path: str, depth: int, altered: list[str]) -> Any:
    """``value`` made encodable; every changed path is appended to ``altered``."""
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            altered.append(path)
            return _readable(value)[:MAX_ORIGINAL_TEXT]
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else _readable(key)
            name = name[:128]
            out[name] = _clean(item, f"{path}.{name}", depth + 1, altered)
        return out
    if isinstance(value, list):
        if depth >= MAX_DEPTH:
            altered.append(path)
            return _readable(value)[:MAX_ORIGINAL_TEXT]
        return [_clean(item, f"{path}[{i}]", depth + 1, altered) for i, item in enumerate(value)]
    if isinstance(value, bool | float | str | decimal.Decimal | _dt.datetime) or value is None:
        if _encodes(value):
            return value
    elif isinstance(value, int) and _encodes(value):
        return value
    altered.append(path)
    return _readable(value)


def _size(headers: Mapping[str, Any]) -> int:
    try:
        return len(encode.field_table(dict(headers)))
    except Exception:
        return MAX_PARKED_HEADER_BYTES + 1


def encodable_headers(
    original: Mapping[str, Any] | None, added: Mapping[str, Any]
) -> dict[str, Any]:
    """The headers of a parked copy: the original ones, made encodable, plus ``added``.

    A value pamqp cannot encode is replaced by a readable text form and its path listed in
    :data:`ALTERED`. Headers too large for the parked copy are replaced by :data:`ORIGINAL`, a
    (truncated) text form of all of them. Nothing is dropped without a trace.
    """
    altered: list[str] = []
    try:
        cleaned = _clean(dict(original or {}), "", 0, altered)
    except RecursionError:  # a structure deeper than MAX_DEPTH cannot reach here; be sure
        cleaned, altered = {}, [""]
    headers: dict[str, Any] = {**cleaned, **added}
    if altered:
        headers[ALTERED] = ", ".join(p.lstrip(".") or "(all)" for p in altered)[:2000]
    if _size(headers) > MAX_PARKED_HEADER_BYTES:
        text = _readable(dict(original or {}))
        headers = {
            **added,
            ORIGINAL: text[:MAX_ORIGINAL_TEXT]
            + (f" … ({len(text)} characters)" if len(text) > MAX_ORIGINAL_TEXT else ""),
        }
    return headers
