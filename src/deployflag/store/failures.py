"""Turn database exceptions into the service's error types, with one-line, secret-free messages.

Transient: the database is unreachable, restarting, overloaded or timed out — retry with backoff.
Fatal: the configuration is wrong (password, database name, schema) — stop and tell the operator.
Bad data: the database refuses a value (SQLSTATE class 22, data exception: too long, NUL in
text, out of range, bad encoding …) — the message carries it, so it is parked as bad input.
Anything else (a bug, a constraint we did not expect) is left as it is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from deployflag.errors import (
    DeployflagError,
    FatalError,
    InvalidRequest,
    TransientError,
    exception_chain,
)
from deployflag.exitcodes import RET_CONFIG
from deployflag.redaction import redact
from deployflag.tls import tls_failure

MAX_DETAIL = 300

# SQLSTATE codes (PostgreSQL appendix A) that mean "the configuration is wrong".
_FATAL_SQLSTATE_CLASSES = ("28",)  # invalid authorization: bad password, no such role, pg_hba
_FATAL_SQLSTATES = frozenset({"3D000", "42501"})  # no such database; permission denied
# … and those that mean "try again later".
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "58")  # connection, rollback, resources,
_TRANSIENT_SQLSTATES = frozenset({"55P03", "55006"})  # operator intervention, I/O; lock timeouts
_DATA_SQLSTATE_CLASS = "22"  # data exception: the value itself is wrong, retrying cannot help


@dataclass(frozen=True)
class Target:
    """What to name in a message about a database: never its password."""

    where: str
    password: str | None

    @classmethod
    def from_url(cls, url: str | URL) -> Target:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            return cls(f"SQLite file {parsed.database or ':memory:'}", None)
        host = parsed.host or "localhost"
        port = parsed.port or 5432
        return cls(f"PostgreSQL at {host}:{port} (database {parsed.database})", parsed.password)

    def scrub(self, text: str) -> str:
        text = redact(text)
        if self.password and len(self.password) >= 3:
            text = text.replace(self.password, "***")
        return text


def _sqlstate(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and len(value) == 5:
            return value
    return None


def _detail(exc: BaseException) -> str:
    """The driver's own words, first line only (SQLAlchemy's wrappers add SQL and links)."""
    inner = [
        e
        for e in exception_chain(exc, suppressed=False)
        if not isinstance(e, sa_exc.SQLAlchemyError)
    ]
    coded = [e for e in inner if _sqlstate(e)]
    best = coded[-1] if coded else inner[0] if inner else exc
    text = str(best).strip()
    text = text.splitlines()[0] if text else type(best).__name__
    # asyncpg errors translated by SQLAlchemy read "<class 'asyncpg....Error'>: message".
    if text.startswith("<class '") and "'>: " in text:
        text = text.split("'>: ", 1)[1]
    return text[:MAX_DETAIL]


def classify(
    exc: BaseException,
) -> type[TransientError] | type[FatalError] | type[InvalidRequest] | None:
    chain = list(exception_chain(exc, suppressed=False))
    for item in chain:
        code = _sqlstate(item)
        if code is None:
            continue
        if code.startswith(_DATA_SQLSTATE_CLASS):
            return InvalidRequest
        if code in _FATAL_SQLSTATES or code.startswith(_FATAL_SQLSTATE_CLASSES):
            return FatalError
        if code in _TRANSIENT_SQLSTATES or code.startswith(_TRANSIENT_SQLSTATE_CLASSES):
            return TransientError
    for item in chain:
        if isinstance(item, OSError | TimeoutError | sa_exc.TimeoutError):
            return TransientError
        if isinstance(item, sa_exc.DBAPIError) and item.connection_invalidated:
            return TransientError
        if isinstance(item, sa_exc.OperationalError | sa_exc.InterfaceError):
            if "no such table" in str(item.orig):  # SQLite file replaced behind our back
                return FatalError
            return TransientError
    return None


def translate(exc: BaseException, target: Target) -> DeployflagError | None:
    """The service's error for ``exc``, or None when it is not a database-availability problem."""
    if isinstance(exc, DeployflagError):
        return exc
    failure = tls_failure(exc)
    if failure is not None:  # retrying cannot make a certificate valid
        return FatalError(
            f"database TLS: {target.where}: {failure} "
            "(check DEPLOYFLAG_DATABASE_SSLMODE, DEPLOYFLAG_DATABASE_SSLROOTCERT and the host)",
            exit_code=RET_CONFIG,
        )
    kind = classify(exc)
    detail = target.scrub(_detail(exc))
    if kind is TransientError:
        return TransientError(f"database unavailable: {target.where}: {detail}")
    if kind is InvalidRequest:
        return InvalidRequest("bad_data", f"the database refused a value: {detail}")
    if kind is FatalError:
        return FatalError(
            f"database refused us: {target.where}: {detail} (check DEPLOYFLAG_DATABASE_URL)",
            exit_code=RET_CONFIG,
        )
    return None


@asynccontextmanager
async def guard(target: Target) -> AsyncIterator[None]:
    """Re-raise database trouble as :class:`TransientError` or :class:`FatalError`."""
    try:
        yield
    except DeployflagError:
        raise
    except Exception as exc:
        mapped = translate(exc, target)
        if mapped is None:
            raise
        raise mapped from exc
