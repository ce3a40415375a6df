"""The TLS settings' checks and the secret files: sources, precedence, and no secret in errors."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from urllib.parse import unquote

import pytest
import trustme

from deployflag import tls, tls_settings
from deployflag.broker.connection import connection_url, ssl_context
from deployflag.errors import FatalError
from deployflag.settings import ConfigError, load_settings

SECRET = "s3cr3t/pa:ss@word"  # characters a URL must encode


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("DEPLOYFLAG_") or name in ("CELERY_BROKER_URL", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    run_secrets = tmp_path / "run-secrets"  # stands in for /run/secrets
    monkeypatch.setattr(tls_settings, "DEFAULT_SECRETS_DIRS", (run_secrets,))
    return run_secrets


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def config_error(**env: str) -> str:
    for name, value in env.items():
        os.environ[name] = value
    try:
        with pytest.raises(ConfigError) as caught:
            load_settings()
    finally:
        for name in env:
            del os.environ[name]
    return str(caught.value)


# --- TLS -------------------------------------------------------------------------------------


def test_amqps_verifies_the_host_and_the_chain_by_default(
    monkeypatch: pytest.MonkeyPatch, ca_file: Path
) -> None:
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqps://u:p@broker.example:5671/")
    context = ssl_context(load_settings())
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    monkeypatch.setenv("DEPLOYFLAG_AMQP_CA_FILE", str(ca_file))
    context = ssl_context(load_settings())
    assert context is not None
    assert context.check_hostname
    assert len(context.get_ca_certs()) == 1  # only the given CA, not the system's


def test_plain_amqp_has_no_context_and_external_auth_goes_into_the_url(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ca_file: Path
) -> None:
    assert ssl_context(load_settings()) is None
    cert = trustme.CA().issue_cert("client")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqps://broker.example/vh")
    monkeypatch.setenv("DEPLOYFLAG_AMQP_CERT_FILE", str(tmp_path / "client.pem"))
    monkeypatch.setenv("DEPLOYFLAG_AMQP_AUTH", "external")
    assert connection_url(load_settings()) == "amqps://broker.example/vh?auth=external"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DEPLOYFLAG_AMQP_CA_FILE": "{ca}"}, "DEPLOYFLAG_AMQP_CA_FILE needs an amqps://"),
        (
            {"DEPLOYFLAG_AMQP_URL": "amqps://h/?cafile=/x"},
            "?cafile= parameter is not used here; set DEPLOYFLAG_AMQP_CA_FILE",
        ),
        (
            {"DEPLOYFLAG_AMQP_URL": "amqps://h/?no_verify_ssl=1"},
            "verification cannot be turned off",
        ),
        (
            {"DEPLOYFLAG_AMQP_URL": "amqps://h/", "DEPLOYFLAG_AMQP_CA_FILE": "/nonexistent.pem"},
            "DEPLOYFLAG_AMQP_CA_FILE: cannot read /nonexistent.pem",
        ),
        ({"DEPLOYFLAG_AMQP_URL": "amqps://h/", "DEPLOYFLAG_AMQP_AUTH": "external"}, "needs an"),
        (
            {"DEPLOYFLAG_DATABASE_URL": "postgresql://u:p@h/db?sslmode=verify-full"},
            "?sslmode= parameter is not used here; set DEPLOYFLAG_DATABASE_SSLMODE",
        ),
        ({"DEPLOYFLAG_DATABASE_SSLMODE": "require"}, "apply to PostgreSQL only"),
        (
            {
                "DEPLOYFLAG_DATABASE_URL": "postgresql://u:p@h/db",
                "DEPLOYFLAG_DATABASE_SSLROOTCERT": "{ca}",
            },
            "DEPLOYFLAG_DATABASE_SSLROOTCERT needs DEPLOYFLAG_DATABASE_SSLMODE",
        ),
        (
            {
                "DEPLOYFLAG_DATABASE_URL": "postgresql://u:p@h/db",
                "DEPLOYFLAG_DATABASE_SSLMODE": "prefer",
            },
            "DEPLOYFLAG_DATABASE_SSLMODE",
        ),
    ],
)
def test_tls_mistakes_are_configuration_errors_naming_the_variable(
    env: dict[str, str], expected: str, ca_file: Path
) -> None:
    message = config_error(**{k: v.format(ca=ca_file) for k, v in env.items()})
    assert expected in message


def test_database_contexts_follow_libpq(ca_file: Path) -> None:
    assert tls.database_context("disable", None, None, None) is None
    require = tls.database_context("require", None, None, None)
    assert require is not None
    assert require.verify_mode == ssl.CERT_NONE
    with_root = tls.database_context("require", ca_file, None, None)  # libpq: like verify-ca
    assert with_root is not None
    assert with_root.verify_mode == ssl.CERT_REQUIRED
    assert not with_root.check_hostname
    full = tls.database_context("verify-full", ca_file, None, None)
    assert full is not None
    assert full.verify_mode == ssl.CERT_REQUIRED
    assert full.check_hostname


def test_an_unloadable_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(FatalError) as caught:
        tls.broker_context(None, bad, None)
    assert caught.value.exit_code == 78
    assert "DEPLOYFLAG_AMQP_CA_FILE" in str(caught.value)


# --- secrets from files --------------------------------------------------------------------


def write_secret(directory: Path, name: str, value: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(value + "\n")  # as `echo` and most tools write them


def test_the_urls_from_an_explicit_secrets_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    write_secret(secrets, "DEPLOYFLAG_AMQP_URL", "amqp://app:from-file@mq:5672/vh")
    write_secret(secrets, "DEPLOYFLAG_DATABASE_URL", "postgresql://app:db-file@pg/deployflag")
    monkeypatch.setenv("DEPLOYFLAG_SECRETS_DIR", str(secrets))
    s = load_settings()
    assert s.broker_url == "amqp://app:from-file@mq:5672/vh"
    assert s.db_url == "postgresql+asyncpg://app:db-file@pg/deployflag"


def test_systemd_credentials_and_run_secrets_are_read_credentials_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, clean_env: Path
) -> None:
    write_secret(clean_env, "DEPLOYFLAG_AMQP_URL", "amqp://app:run-secrets@mq/")
    assert load_settings().broker_url == "amqp://app:run-secrets@mq/"
    credentials = tmp_path / "credentials"
    write_secret(credentials, "DEPLOYFLAG_AMQP_URL", "amqp://app:credential@mq/")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert load_settings().broker_url == "amqp://app:credential@mq/"


def test_an_environment_variable_wins_over_a_secret_file(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    write_secret(clean_env, "DEPLOYFLAG_AMQP_URL", "amqp://app:file@mq/")
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqp://app:env@mq/")
    assert load_settings().broker_url == "amqp://app:env@mq/"


def test_password_files_replace_the_passwords_in_the_urls(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    write_secret(clean_env, "DEPLOYFLAG_AMQP_PASSWORD", SECRET)
    write_secret(clean_env, "DEPLOYFLAG_DATABASE_PASSWORD", SECRET)
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqps://app@mq.example/vh")
    monkeypatch.setenv("DEPLOYFLAG_DATABASE_URL", "postgresql://app:placeholder@pg/deployflag")
    s = load_settings()
    user_info = s.broker_url.split("//", 1)[1].rsplit("@", 1)[0]
    assert unquote(user_info.split(":", 1)[1]) == SECRET
    assert s.broker_url.endswith("@mq.example/vh")
    from sqlalchemy.engine import make_url

    assert make_url(s.db_url).password == SECRET
    described = repr(s.describe()) + repr(s)
    assert SECRET not in described
    assert user_info.split(":", 1)[1] not in described


def test_a_password_file_needs_a_user_in_the_url(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    write_secret(clean_env, "DEPLOYFLAG_AMQP_PASSWORD", SECRET)
    monkeypatch.setenv("DEPLOYFLAG_AMQP_URL", "amqp://mq/")
    message = config_error()
    assert "DEPLOYFLAG_AMQP_URL must name the user" in message
    assert SECRET not in message


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("DEPLOYFLAG_AMQP_URL", f"http://app:{SECRET}@mq/"),
        ("DEPLOYFLAG_DATABASE_URL", f"mysql://app:{SECRET}@db/x"),
    ],
)
def test_a_bad_url_in_a_secret_file_is_reported_without_its_password(
    clean_env: Path, name: str, url: str
) -> None:
    write_secret(clean_env, name, url)
    message = config_error()
    assert message.startswith(name)
    assert SECRET not in message
    assert "pa:ss" not in message


def test_a_secrets_dir_that_is_not_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    message = config_error(DEPLOYFLAG_SECRETS_DIR=str(tmp_path / "missing"))
    assert "DEPLOYFLAG_SECRETS_DIR" in message


# --- the deployment files use them ---------------------------------------------------------

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_the_systemd_unit_loads_credentials_named_as_the_variables() -> None:
    unit = (DOCKER / "deployflag.service").read_text(encoding="utf-8")
    assert "\nLoadCredential=DEPLOYFLAG:/etc/deployflag/credentials\n" in unit


def test_compose_gives_the_database_password_as_a_secret_file() -> None:
    import yaml

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    service = compose["services"]["deployflag"]
    assert {"source": "database_password", "target": "DEPLOYFLAG_DATABASE_PASSWORD"} in service[
        "secrets"
    ]
    url = service["environment"]["DEPLOYFLAG_DATABASE_URL"]
    assert ":${POSTGRES_PASSWORD" not in url  # no password in the environment any more
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/database_password"
    assert (DOCKER / compose["secrets"]["database_password"]["file"]).is_file()
