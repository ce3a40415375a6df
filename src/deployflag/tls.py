"""TLS contexts for the broker and the database, and how to tell a TLS mistake from an outage.

Both sides are configured the same way, with dedicated settings (never URL parameters):

- broker: ``amqps://`` turns TLS on; the server certificate is always verified, against
  ``DEPLOYFLAG_AMQP_CA_FILE`` or the system's trust store, host name included. A client
  certificate is optional, and with it the ``EXTERNAL`` mechanism (no password).
- PostgreSQL: ``DEPLOYFLAG_DATABASE_SSLMODE`` with libpq's meanings (``require`` encrypts,
  ``verify-ca`` also checks the chain, ``verify-full`` also the host name). Unlike libpq there is
  no ``prefer``/``allow``: once TLS is asked for, nothing is ever sent in clear.

A certificate that does not verify is a configuration error: retrying cannot make it valid, so
start-up stops with exit 78 instead of looping.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from deployflag.errors import FatalError, exception_chain
from deployflag.exitcodes import RET_CONFIG

# Handshake failures that mean "the peer is not what the settings say", as opposed to a peer that
# went away mid-handshake (EOF, reset), which a restarting server produces too.
_TRANSIENT_SSL_ERRORS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError)
# asyncpg's words for a server that answered the TLS request with "no".
_PG_TLS_REFUSED = "rejected SSL upgrade"


def _context(
    *,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    verify: bool,
    check_hostname: bool,
    variables: str,
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise FatalError(
            f"cannot load the CA file {ca_file}: {_reason(exc)} ({variables})", RET_CONFIG
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.check_hostname = check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise FatalError(
                f"cannot load the client certificate {cert_file}: {_reason(exc)} ({variables})",
                RET_CONFIG,
            ) from None
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return getattr(exc, "strerror", None) or str(exc)


def broker_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """Verification on, host name checked: there is no way to turn either off."""
    return _context(
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        verify=True,
        check_hostname=True,
        variables="check DEPLOYFLAG_AMQP_CA_FILE / _CERT_FILE / _KEY_FILE",
    )


def database_context(
    sslmode: str, root_cert: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext | None:
    """The context for ``sslmode``; None for ``disable``.

    As in libpq, ``require`` with a root certificate given behaves like ``verify-ca``.
    """
    if sslmode == "disable":
        return None
    verify = sslmode in ("verify-ca", "verify-full") or root_cert is not None
    return _context(
        ca_file=root_cert,
        cert_file=cert_file,
        key_file=key_file,
        verify=verify,
        check_hostname=sslmode == "verify-full",
        variables="check DEPLOYFLAG_DATABASE_SSLROOTCERT / _SSLCERT / _SSLKEY",
    )


def tls_failure(exc: BaseException) -> str | None:
    """One line naming the TLS problem behind ``exc``, or None when it is not one.

    A certificate that fails verification (unknown CA, wrong host name, expired), a server that
    does not speak TLS, or one that refuses our client certificate.
    """
    for item in exception_chain(exc, suppressed=True):
        if isinstance(item, ssl.SSLCertVerificationError):
            return f"certificate verification failed: {item.verify_message or item.reason}"
        if isinstance(item, ssl.SSLError) and not isinstance(item, _TRANSIENT_SSL_ERRORS):
            return f"TLS handshake failed: {item.reason or item}"
        if isinstance(item, ConnectionError) and _PG_TLS_REFUSED in str(item):
            return "the server does not accept TLS connections"
    return None
