"""Checks and rewrites of the TLS and secret settings (pure functions, used by the settings class).

Each raises ``ValueError`` with a message that names the variable to fix and holds no secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

from sqlalchemy.engine import make_url

# Query parameters that aiormq and asyncpg would read themselves: TLS is configured with the
# dedicated settings only, so one place says whether (and how) a connection is encrypted.
AMQP_TLS_QUERY = {
    "cafile": "DEPLOYFLAG_AMQP_CA_FILE",
    "capath": "DEPLOYFLAG_AMQP_CA_FILE",
    "cadata": "DEPLOYFLAG_AMQP_CA_FILE",
    "certfile": "DEPLOYFLAG_AMQP_CERT_FILE",
    "keyfile": "DEPLOYFLAG_AMQP_KEY_FILE",
    "no_verify_ssl": "DEPLOYFLAG_AMQP_CA_FILE (verification cannot be turned off)",
    "auth": "DEPLOYFLAG_AMQP_AUTH",
}
DATABASE_TLS_QUERY = {
    "ssl": "DEPLOYFLAG_DATABASE_SSLMODE",
    "sslmode": "DEPLOYFLAG_DATABASE_SSLMODE",
    "sslrootcert": "DEPLOYFLAG_DATABASE_SSLROOTCERT",
    "sslcert": "DEPLOYFLAG_DATABASE_SSLCERT",
    "sslkey": "DEPLOYFLAG_DATABASE_SSLKEY",
    "sslpassword": "DEPLOYFLAG_DATABASE_SSLKEY (an unencrypted key)",
    "sslcrl": "DEPLOYFLAG_DATABASE_SSLROOTCERT",
    "sslnegotiation": "DEPLOYFLAG_DATABASE_SSLMODE",
}

# Where secret files are looked for when DEPLOYFLAG_SECRETS_DIR is unset, lowest precedence first:
# Docker/Kubernetes secrets, then systemd credentials (LoadCredential=).
DEFAULT_SECRETS_DIRS = (Path("/run/secrets"),)
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"


def secrets_dirs(environ: dict[str, str] | os._Environ[str]) -> list[Path]:
    """The secret directories to read, lowest precedence first."""
    explicit = environ.get("DEPLOYFLAG_SECRETS_DIR", "").strip()
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise ValueError(f"DEPLOYFLAG_SECRETS_DIR: {explicit} is not a directory")
        return [path]
    found = [path for path in DEFAULT_SECRETS_DIRS if path.is_dir()]
    credentials = environ.get(CREDENTIALS_VARIABLE, "").strip()
    if credentials and Path(credentials).is_dir():
        found.append(Path(credentials))
    return found


def _query_keys(query: str) -> set[str]:
    return {key.lower() for key, _ in parse_qsl(query, keep_blank_values=True)}


def check_amqp_url(url: str) -> None:
    for key in sorted(_query_keys(urlsplit(url).query) & AMQP_TLS_QUERY.keys()):
        raise ValueError(
            f"DEPLOYFLAG_AMQP_URL: the ?{key}= parameter is not used here; "
            f"set {AMQP_TLS_QUERY[key]} instead"
        )


def with_amqp_password(url: str, password: str) -> str:
    """``url`` with its password replaced (percent-encoded); the user must be in the URL."""
    parts = urlsplit(url)
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    if not user:
        raise ValueError(
            "DEPLOYFLAG_AMQP_PASSWORD: DEPLOYFLAG_AMQP_URL must name the user (amqp://USER@HOST/)"
        )
    netloc = f"{user}:{quote(password, safe='')}@{hostinfo}"
    return urlunsplit(parts._replace(netloc=netloc))


def check_amqp_tls(
    url: str,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    auth: str,
) -> None:
    tls = url.startswith("amqps://")
    for variable, path in (
        ("DEPLOYFLAG_AMQP_CA_FILE", ca_file),
        ("DEPLOYFLAG_AMQP_CERT_FILE", cert_file),
        ("DEPLOYFLAG_AMQP_KEY_FILE", key_file),
    ):
        if path is None:
            continue
        if not tls:
            raise ValueError(f"{variable} needs an amqps:// DEPLOYFLAG_AMQP_URL")
        _readable(variable, path)
    if key_file is not None and cert_file is None:
        raise ValueError("DEPLOYFLAG_AMQP_KEY_FILE needs DEPLOYFLAG_AMQP_CERT_FILE")
    if auth == "external" and (not tls or cert_file is None):
        raise ValueError(
            "DEPLOYFLAG_AMQP_AUTH=external needs an amqps:// URL and DEPLOYFLAG_AMQP_CERT_FILE"
        )


def check_database_tls(
    url: str,
    sslmode: str | None,
    root_cert: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> None:
    parsed = make_url(url)
    for key in sorted({k.lower() for k in parsed.query} & DATABASE_TLS_QUERY.keys()):
        raise ValueError(
            f"DEPLOYFLAG_DATABASE_URL: the ?{key}= parameter is not used here; "
            f"set {DATABASE_TLS_QUERY[key]} instead"
        )
    files = (
        ("DEPLOYFLAG_DATABASE_SSLROOTCERT", root_cert),
        ("DEPLOYFLAG_DATABASE_SSLCERT", cert_file),
        ("DEPLOYFLAG_DATABASE_SSLKEY", key_file),
    )
    configured = sslmode is not None or any(path is not None for _, path in files)
    if configured and parsed.get_backend_name() == "sqlite":
        raise ValueError("DEPLOYFLAG_DATABASE_SSLMODE and its files apply to PostgreSQL only")
    for variable, path in files:
        if path is None:
            continue
        if sslmode in (None, "disable"):
            raise ValueError(f"{variable} needs DEPLOYFLAG_DATABASE_SSLMODE (require, verify-…)")
        _readable(variable, path)
    if key_file is not None and cert_file is None:
        raise ValueError("DEPLOYFLAG_DATABASE_SSLKEY needs DEPLOYFLAG_DATABASE_SSLCERT")


def _readable(variable: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
