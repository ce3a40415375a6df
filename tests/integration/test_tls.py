"""TLS to the broker and the database, with a CA made for the test run.

The service serves over both; a certificate for the wrong host or from an unknown CA stops it at
once with one line and exit 78; what it opens is encrypted (checked on the servers' side).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from deployflag import exitcodes
from tests.support.broker import Names, ServiceProcess, Upstream
from tests.support.tls import CLIENT_NAME, Certificates, TLSBroker, TLSPostgres
from tests.support.toolkit import wait_until

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
START_TIMEOUT = 90  # a refused start must end well within this: no retry loop


def refused(env: dict[str, str]) -> str:
    """Run `serve`, expect exit 78 and one error line; return that line."""
    done = subprocess.run(
        [sys.executable, "-m", "deployflag", "serve"],
        env=env,
        capture_output=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    err = done.stderr.decode(errors="replace")
    assert done.returncode == exitcodes.RET_CONFIG, err
    assert "Traceback" not in err
    assert "not reachable yet" not in err, "a certificate error must not be retried"
    errors = [line for line in err.splitlines() if line.startswith("deployflag: ")]
    assert len(errors) == 1, err
    return errors[0]


async def answered(url: str, names: Names) -> dict[str, object]:
    async with Upstream(url, names) as upstream:
        request_id = str(uuid.uuid4())
        await upstream.publish(WORKED, message_id=request_id)
        [reply] = await upstream.drain("save_result", 1, timeout=90)
    result: dict[str, object] = orjson.loads(reply.body)
    assert result["request_id"] == request_id
    assert result["status"] == "ok"
    return result


def service_connections(broker: TLSBroker) -> list[dict[str, str]]:
    """The node's connections once the test's upstream has closed its own: the service's."""
    return broker.connections()


# --- the broker ----------------------------------------------------------------------------------


async def test_service_serves_over_amqps_and_every_connection_is_tls(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    names: Names,
    tls_broker: TLSBroker,
    certs: Certificates,
) -> None:
    start_service(
        service_env,
        DEPLOYFLAG_AMQP_URL=tls_broker.tls_url(),
        DEPLOYFLAG_AMQP_CA_FILE=str(certs.ca),
    )
    await answered(tls_broker.plain_url, names)
    connections = service_connections(tls_broker)
    assert connections, tls_broker.connections()
    assert all(c["ssl"] == "true" for c in connections), connections
    assert {c["user"] for c in connections} == {"guest"}


async def test_external_auth_logs_in_with_the_client_certificate(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    names: Names,
    tls_broker: TLSBroker,
    certs: Certificates,
) -> None:
    start_service(
        service_env,
        DEPLOYFLAG_AMQP_URL=tls_broker.tls_url(credentials=""),
        DEPLOYFLAG_AMQP_CA_FILE=str(certs.ca),
        DEPLOYFLAG_AMQP_CERT_FILE=str(certs.client_cert),
        DEPLOYFLAG_AMQP_KEY_FILE=str(certs.client_key),
        DEPLOYFLAG_AMQP_AUTH="external",
    )
    await answered(tls_broker.plain_url, names)
    connections = service_connections(tls_broker)
    assert connections
    assert {(c["user"], c["auth_mechanism"], c["ssl"]) for c in connections} == {
        (CLIENT_NAME, "EXTERNAL", "true")
    }


@pytest.mark.parametrize(
    ("case", "host", "ca"),
    [
        ("wrong host name", "localhost", "ca"),
        ("unknown CA", "127.0.0.1", "other_ca"),
        ("the system's CAs (the default)", "127.0.0.1", None),
    ],
)
def test_broker_certificate_not_verified_is_exit_78_at_once(
    service_env: dict[str, str],
    tls_broker: TLSBroker,
    certs: Certificates,
    case: str,
    host: str,
    ca: str | None,
) -> None:
    env = {**service_env, "DEPLOYFLAG_AMQP_URL": tls_broker.tls_url(host=host)}
    if ca is not None:
        env["DEPLOYFLAG_AMQP_CA_FILE"] = str(getattr(certs, ca))
    line = refused(env)
    assert "broker TLS" in line, (case, line)
    assert "certificate verification failed" in line, (case, line)
    assert "guest:guest" not in line
    assert service_connections(tls_broker) == []


# --- PostgreSQL ----------------------------------------------------------------------------------


def pg_env(
    service_env: dict[str, str], cluster: TLSPostgres, certs: Certificates, **extra: str
) -> dict[str, str]:
    database = f"tls_{uuid.uuid4().hex[:8]}"
    return {
        **service_env,
        "DEPLOYFLAG_DATABASE_URL": cluster.fresh_database(database),
        "DEPLOYFLAG_AUTO_MIGRATE": "true",
        "DEPLOYFLAG_DATABASE_SSLMODE": "verify-full",
        "DEPLOYFLAG_DATABASE_SSLROOTCERT": str(certs.ca),
        "DEPLOYFLAG_DATABASE_SSLCERT": str(certs.client_cert),
        "DEPLOYFLAG_DATABASE_SSLKEY": str(certs.client_key),
        **extra,
    }


async def test_service_serves_over_postgres_verify_full_and_every_connection_is_tls(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    names: Names,
    rabbit_url: str,
    tls_postgres: TLSPostgres,
    certs: Certificates,
) -> None:
    # The cluster refuses TCP without TLS and without a client certificate from the test CA.
    service = start_service(pg_env(service_env, tls_postgres, certs))
    await answered(rabbit_url, names)
    encrypted, total = wait_until(
        lambda: (counts := tls_postgres.tls_connections())[1] > 0 and counts,
        timeout=10,
        what="the service's database connections",
    )
    assert encrypted == total
    assert service.stop() == 0


@pytest.mark.parametrize(
    ("case", "sslmode", "root", "use_localhost"),
    [
        ("wrong host name", "verify-full", "ca", True),
        ("unknown CA", "verify-ca", "other_ca", False),
        ("the system's CAs (the default)", "verify-full", None, False),
    ],
)
def test_database_certificate_not_verified_is_exit_78_at_once(
    service_env: dict[str, str],
    tls_postgres: TLSPostgres,
    certs: Certificates,
    case: str,
    sslmode: str,
    root: str | None,
    use_localhost: bool,
) -> None:
    env = pg_env(service_env, tls_postgres, certs, DEPLOYFLAG_DATABASE_SSLMODE=sslmode)
    if use_localhost:
        env["DEPLOYFLAG_DATABASE_URL"] = env["DEPLOYFLAG_DATABASE_URL"].replace(
            "@127.0.0.1:", "@localhost:"
        )
    if root is None:
        del env["DEPLOYFLAG_DATABASE_SSLROOTCERT"]
    else:
        env["DEPLOYFLAG_DATABASE_SSLROOTCERT"] = str(getattr(certs, root))
    line = refused(env)
    assert "database TLS" in line, (case, line)
    assert "certificate verification failed" in line, (case, line)
    assert tls_postgres.password not in line


def test_require_encrypts_without_verifying_and_disable_is_refused_by_the_server(
    service_env: dict[str, str], tls_postgres: TLSPostgres, certs: Certificates
) -> None:
    def migrate(env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "deployflag", "migrate"],
            env=env,
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )

    env = pg_env(service_env, tls_postgres, certs, DEPLOYFLAG_DATABASE_SSLMODE="require")
    del env["DEPLOYFLAG_DATABASE_SSLROOTCERT"]
    done = migrate(env)
    assert done.returncode == 0, done.stderr
    # In clear, the server's pg_hba refuses us: a configuration error, not a retry.
    for name in ("DEPLOYFLAG_DATABASE_SSLCERT", "DEPLOYFLAG_DATABASE_SSLKEY"):
        del env[name]
    env["DEPLOYFLAG_DATABASE_SSLMODE"] = "disable"
    done = migrate(env)
    assert done.returncode == exitcodes.RET_CONFIG, done.stderr
    assert b"no encryption" in done.stderr
