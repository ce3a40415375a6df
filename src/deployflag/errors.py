"""The few exception types that decide what happens to a message (see service.py's policy)."""

from __future__ import annotations


class DeployflagError(Exception):
    """Base of every error the service handles on purpose."""


class InvalidRequest(DeployflagError):
    """The message itself is wrong: park it with ``reason`` (a short code) and ack it.

    Retrying cannot help, so these are never requeued.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[InvalidRequest], tuple[str, str]]:
        # Exceptions cross the process pool by pickling; keep both fields.
        return (type(self), (self.reason, self.message))


class TransientError(DeployflagError):
    """Something outside the message failed (database, broker): keep it unacked and retry later."""


class FatalError(DeployflagError):
    """The service cannot go on (bad configuration, schema behind): stop with an exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
