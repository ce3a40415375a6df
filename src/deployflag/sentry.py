"""Optional error reporting to Sentry (the ``sentry`` extra).

Off unless ``DEPLOYFLAG_SENTRY_DSN`` (or the original's ``SENTRY_DSN``) is set; then only explicit
:func:`capture` calls and uncaught crashes are sent. Without a DSN ``sentry_sdk`` is not even
imported. Events never carry local variables (a payload can be megabytes of a customer's history)
and every string in them passes through :func:`deployflag.redaction.redact`.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

import structlog

from deployflag import __version__
from deployflag.redaction import redact

if TYPE_CHECKING:
    from deployflag.settings import Settings

log = structlog.get_logger(__name__)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value) if "://" in value else value
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    return value


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any]:
    """Remove URL passwords from everything in the event (messages, exception values, tags)."""
    scrubbed: dict[str, Any] = _scrub(event)
    return scrubbed


def init_sentry(settings: Settings, **options: Any) -> bool:
    """Start the Sentry client when a DSN is set; True when it was started.

    ``options`` go to ``sentry_sdk.init`` unchanged (tests pass a ``transport``).
    """
    if settings.sentry_dsn is None:
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.logging import LoggingIntegration
    except ImportError:
        log.warning(
            "sentry_unavailable",
            detail="DEPLOYFLAG_SENTRY_DSN is set but sentry-sdk is not installed; "
            "install deployflag[sentry] to report errors",
        )
        return False
    config: dict[str, Any] = {
        "dsn": settings.sentry_dsn.get_secret_value(),
        "release": f"deployflag@{__version__}",
        # No PII: send_default_pii stays unset, which means False on every sentry-sdk 2.x (newer
        # releases deprecate the option in favour of data_collection, whose default is the same).
        "include_local_variables": False,
        "max_request_body_size": "never",
        "before_send": _before_send,
        # Only explicit captures become events: log lines stay breadcrumbs, and no library is
        # instrumented behind our back (tracing is off).
        "auto_enabling_integrations": False,
        "integrations": [LoggingIntegration(level=logging.INFO, event_level=None)],
    }
    config.update(options)
    sentry_sdk.init(**config)
    log.info("sentry_enabled", release=config["release"])
    return True


def enabled() -> bool:
    """True when a Sentry client is active (checked without importing sentry_sdk)."""
    module = sys.modules.get("sentry_sdk")
    return module is not None and bool(module.is_initialized())


def capture(exc: BaseException, *, request_id: object, repo_id: object) -> None:
    """Report ``exc`` tagged with the request it broke; a no-op when Sentry is off."""
    if not enabled():
        return
    import sentry_sdk

    with sentry_sdk.new_scope() as scope:
        # Sentry rejects empty tag values: a request that failed before its id was known has none.
        if request_id is not None:
            scope.set_tag("request_id", str(request_id))
        if repo_id is not None:
            scope.set_tag("repo_id", str(repo_id))
        sentry_sdk.capture_exception(exc)


def flush(timeout: float = 2.0) -> None:
    """Send what is queued (call before exiting); a no-op when Sentry is off."""
    if enabled():
        import sentry_sdk

        sentry_sdk.flush(timeout=timeout)
