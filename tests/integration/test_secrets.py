"""Passwords read from secret files reach the broker and the database, and nothing the service
emits carries them: logs, error lines, HTTP endpoints, replies, parked messages, Sentry events."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import orjson
import pytest
import structlog

from deployflag import exitcodes, sentry
from deployflag.settings import load_settings
from tests.support.broker import Names, ServiceProcess, Upstream
from tests.support.postgres import PostgresCluster
from tests.support.toolkit import free_port, rabbitmqctl
from tests.unit.test_sentry import MemoryTransport

pytestmark = [pytest.mark.rabbitmq, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()


def forms(secret: str) -> list[str]:
    """The ways a secret can appear in text: as it is and percent-encoded."""
    return sorted({secret, quote(secret, safe="")})


def assert_absent(secret: str, text: str, where: str) -> None:
    for form in forms(secret):
        assert form not in text, f"the secret appears in {where}"


@pytest.fixture
def broker_user(rabbit_url: str) -> Iterator[tuple[str, str]]:
    """A broker user of this test's own, with a random password that only a secret file holds."""
    vhost = urlsplit(rabbit_url).path.lstrip("/")
    user = f"df-secret-{uuid.uuid4().hex[:8]}"
    password = "pw-" + secrets.token_urlsafe(24)
    rabbitmqctl("add_user", user, password)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


def http_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode(errors="replace"))
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode(errors="replace"))


async def test_passwords_from_files_work_and_never_appear_in_anything_emitted(
    tmp_path: Path,
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    names: Names,
    rabbit_url: str,
    broker_user: tuple[str, str],
    postgres: PostgresCluster,
) -> None:
    user, amqp_password = broker_user
    db_password = postgres.password
    vhost = urlsplit(rabbit_url).path
    database_url = postgres.fresh_database(f"secrets_{uuid.uuid4().hex[:8]}")
    # The URLs name the users only; the passwords are files in the secrets directory.
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir(mode=0o700)
    (secret_dir / "DEPLOYFLAG_AMQP_PASSWORD").write_text(amqp_password + "\n")
    (secret_dir / "DEPLOYFLAG_DATABASE_PASSWORD").write_text(db_password + "\n")
    env = {
        **service_env,
        "DEPLOYFLAG_AMQP_URL": f"amqp://{user}@127.0.0.1:5672{vhost}",
        "DEPLOYFLAG_DATABASE_URL": database_url.replace(f":{db_password}@", "@"),
        "DEPLOYFLAG_SECRETS_DIR": str(secret_dir),
        "DEPLOYFLAG_AUTO_MIGRATE": "true",
        "DEPLOYFLAG_LOG_LEVEL": "DEBUG",
    }
    assert db_password not in env["DEPLOYFLAG_DATABASE_URL"]
    emitted: list[tuple[str, str]] = []

    # A service that serves a good request and parks a bad one, then drains.
    service = start_service(env)
    async with Upstream(rabbit_url, names) as upstream:
        await upstream.publish(WORKED, message_id="good")
        await upstream.publish(b"{not json", message_id="bad")
        [reply] = await upstream.drain("save_result", 1, timeout=90)
        [parked] = await upstream.drain("failed", 1, timeout=90)
    assert orjson.loads(reply.body)["status"] == "ok"
    emitted.append(("the reply", repr(reply.headers) + reply.body.decode(errors="replace")))
    emitted.append(("the parked message", repr(parked.headers) + repr(parked.body)))
    for path in ("/healthz", "/readyz", "/metrics"):
        emitted.append((path, http_get(service.http_port, path)))
    assert service.stop() == 0
    emitted.append(("the service's log", service.log()))

    # Start-ups that fail: wrong passwords from the files, a broker that is not there.
    def failed_start(what: str, expected: int, **changes: str) -> None:
        run_env = {**env, "DEPLOYFLAG_HTTP_PORT": str(free_port()), **changes}
        done = subprocess.run(
            [sys.executable, "-m", "deployflag", "serve"],
            env=run_env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        output = (done.stdout + done.stderr).decode(errors="replace")
        assert done.returncode == expected, output
        emitted.append((what, output))

    wrong = tmp_path / "wrong-secrets"
    wrong.mkdir()
    (wrong / "DEPLOYFLAG_AMQP_PASSWORD").write_text(amqp_password + "-wrong\n")
    (wrong / "DEPLOYFLAG_DATABASE_PASSWORD").write_text(db_password + "\n")
    failed_start("a wrong broker password", exitcodes.RET_CONFIG, DEPLOYFLAG_SECRETS_DIR=str(wrong))
    (wrong / "DEPLOYFLAG_AMQP_PASSWORD").write_text(amqp_password + "\n")
    (wrong / "DEPLOYFLAG_DATABASE_PASSWORD").write_text(db_password + "-wrong\n")
    failed_start(
        "a wrong database password", exitcodes.RET_CONFIG, DEPLOYFLAG_SECRETS_DIR=str(wrong)
    )
    failed_start(
        "an unreachable broker",
        exitcodes.RET_BROKER,
        DEPLOYFLAG_AMQP_URL=f"amqp://{user}@127.0.0.1:{free_port()}{vhost}",
        DEPLOYFLAG_BROKER_CONNECT_TIMEOUT="1",
    )

    for where, text in emitted:
        assert text, f"nothing captured from {where}"
        for secret in (amqp_password, db_password):
            assert_absent(secret, text, where)
            assert_absent(secret + "-wrong", text, where)


def test_sentry_events_carry_no_secret_from_a_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Real connection errors, whose text names the URL, captured as the service captures them."""
    import sentry_sdk

    password = "pw-" + secrets.token_urlsafe(24)
    for name in list(os.environ):
        if name.startswith("DEPLOYFLAG_"):
            monkeypatch.delenv(name)
    secret_dir = tmp_path / "secrets"
    secret_dir.mkdir()
    port = free_port()
    (secret_dir / "DEPLOYFLAG_AMQP_URL").write_text(f"amqp://app:{password}@127.0.0.1:{port}/\n")
    (secret_dir / "DEPLOYFLAG_DATABASE_URL").write_text(
        f"postgresql://app:{password}@127.0.0.1:{port}/db\n"
    )
    monkeypatch.setenv("DEPLOYFLAG_SECRETS_DIR", str(secret_dir))
    monkeypatch.chdir(tmp_path)
    settings = load_settings(sentry_dsn="https://public@sentry.example.invalid/1")
    assert password in settings.broker_url  # the file was read

    transport = MemoryTransport()
    try:
        sentry.init_sentry(settings, transport=transport)
        errors: list[BaseException] = []

        async def fail_both() -> None:
            import aio_pika

            from deployflag.store import Store

            for attempt in (aio_pika.connect(settings.broker_url, timeout=5), Store.open(settings)):
                try:
                    await attempt
                except Exception as exc:
                    errors.append(exc)

        asyncio.run(fail_both())
        assert len(errors) == 2
        structlog.get_logger("test").warning("settings", **settings.describe())
        for exc in errors:
            sentry.capture(exc, request_id="r", repo_id=1)
        sentry.capture(RuntimeError(f"wrapped: {settings.db_url}"), request_id="r", repo_id=1)
        sentry.flush()
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)
    assert len(transport.events) == 3
    text = orjson.dumps(transport.events, default=str).decode()
    assert "127.0.0.1" in text  # the events do describe the failures
    assert_absent(password, text, "a Sentry event")
