"""structlog set-up: JSON lines for machines, colourless console lines for people.

Both the service process and the pool's worker processes call :func:`configure`; request_id and
repo_id are bound with structlog's contextvars so every line about a message carries them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from deployflag.redaction import redact


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact(value)
    return event


def configure(log_format: str = "json", level: str = "INFO") -> None:
    """Idempotent; safe to call in every process."""
    numeric = logging.getLevelName(level.upper())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact_secrets,
    ]
    if log_format == "console":
        processors += [structlog.dev.ConsoleRenderer(colors=False)]
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries log through the stdlib; keep their noise at WARNING and on the same stream.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str = "deployflag") -> Any:
    return structlog.get_logger(name)
