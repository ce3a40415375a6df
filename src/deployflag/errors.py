"""The few exception types that decide what happens to a message (the table in docs/handler.md)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class DeployflagError(Exception):
    """Base of every error the service handles on purpose."""


class InvalidRequest(DeployflagError):
    """The delivery cannot be answered: park it with ``reason`` (a short code), then ack it.

    The one rejection type, wherever it is decided: the envelope or the data is wrong, the
    pipeline refused the data, the request ran out of attempts, its reply cannot be delivered.
    Retrying cannot help, so these are never requeued. ``request_id`` / ``repo_id`` name the
    request when the rejection knows better than the handler (a body that never decoded).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        request_id: str | None = None,
        repo_id: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.request_id = request_id
        self.repo_id = repo_id

    def __reduce__(self) -> tuple[type[InvalidRequest], tuple[str, str, str | None, Any]]:
        # Exceptions cross the process pool by pickling; keep every field.
        return (type(self), (self.reason, self.message, self.request_id, self.repo_id))


class TransientError(DeployflagError):
    """Something outside the message failed (database, broker): keep it unacked and retry later."""


class FatalError(DeployflagError):
    """The service cannot go on (bad configuration, schema behind): stop with an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exception_chain(exc: BaseException, *, suppressed: bool) -> Iterator[BaseException]:
    """The exception, what it wraps (a driver's ``.orig``) and what caused it, outermost first,
    each once. ``suppressed``: also follow a context hidden by ``raise … from None``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        hidden = current.__suppress_context__ and not suppressed
        context = None if hidden else current.__context__
        for nxt in (getattr(current, "orig", None), current.__cause__, context):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
