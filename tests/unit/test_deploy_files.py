"""The container image, compose file and Cloud Build configs say what operations rely on.

Docker cannot run here, so these read the files: the non-root user, the health check, the
commands, the start order in compose and the build steps.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions as (KEYWORD, arguments), grouped by stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
            continue
        if keyword == "FROM":
            for name, value in args.items():
                rest = rest.replace("${" + name + "}", value)
            stages.append([])
        stages[-1].append((keyword, rest))
    return stages


def final_stage() -> list[tuple[str, str]]:
    return dockerfile_stages()[-1]


def instruction(keyword: str) -> list[str]:
    return [rest for key, rest in final_stage() if key == keyword]


def exec_form(text: str) -> list[str]:
    parsed = yaml.safe_load(text)  # a JSON array is YAML too
    assert isinstance(parsed, list), f"not exec form: {text}"
    return parsed


def test_builds_on_python_311_slim_in_two_stages() -> None:
    stages = dockerfile_stages()
    assert len(stages) == 2
    assert stages[0][0] == ("FROM", "python:3.11-slim AS builder")
    assert stages[1][0] == ("FROM", "python:3.11-slim")
    copies = instruction("COPY")
    assert any(c.startswith("--from=builder /opt/venv /opt/venv") for c in copies)


def test_runs_as_a_non_root_user_with_a_fixed_uid() -> None:
    users = instruction("USER")
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user in ("10001", "deployflag")
    run = " ".join(instruction("RUN"))
    assert "--uid 10001" in run
    assert "useradd" in run


def test_service_command_health_check_and_signals() -> None:
    assert exec_form(instruction("CMD")[-1]) == ["python", "-m", "deployflag", "serve"]
    healthcheck = instruction("HEALTHCHECK")[-1]
    options, _, command = healthcheck.partition("CMD ")
    assert exec_form(command) == ["python", "-m", "deployflag", "healthcheck"]
    assert "--timeout=" in options
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert "8080" in instruction("EXPOSE")[-1].split()


def test_environment_workdir_and_volume() -> None:
    env: dict[str, str] = {}
    for rest in instruction("ENV"):
        for token in shlex.split(rest):
            name, _, value = token.partition("=")
            env[name] = value
    assert env["DEPLOYFLAG_HTTP_HOST"] == "0.0.0.0"
    assert env["DEPLOYFLAG_DATA_DIR"] == "/var/lib/deployflag"
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert instruction("WORKDIR")[-1] == "/app"
    assert exec_form(instruction("VOLUME")[-1]) == ["/var/lib/deployflag"]
    run = " ".join(instruction("RUN"))
    assert "chown 10001:10001 /var/lib/deployflag" in run


def test_migrations_are_in_the_working_directory() -> None:
    copies = instruction("COPY")
    assert "alembic.ini ./" in copies
    assert "migrations ./migrations" in copies


def test_every_copied_path_exists_and_is_not_docker_ignored() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for stage in dockerfile_stages():
        for keyword, rest in stage:
            if keyword != "COPY" or rest.startswith("--from="):
                continue
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


# --- compose ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    always = {name for name, service in services.items() if "profiles" not in service}
    assert always == {"rabbitmq", "postgres", "migrate", "deployflag"}
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.13-management")
    assert services["postgres"]["image"] == "postgres:16"
    for name in ("migrate", "deployflag"):
        assert services[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (COMPOSE.parent / services[name]["build"]["context"] / "docker/Dockerfile").exists()
    assert services["migrate"]["command"] == ["python", "-m", "deployflag", "migrate"]
    assert services["deployflag"]["command"] == ["python", "-m", "deployflag", "serve"]


def test_compose_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["rabbitmq"]["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
    ]
    postgres = services["postgres"]["healthcheck"]["test"]
    assert postgres[0] in ("CMD", "CMD-SHELL")
    assert "pg_isready" in " ".join(postgres)


def test_compose_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["deployflag"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


def test_compose_service_environment_ports_and_stop(compose: dict[str, Any]) -> None:
    service = compose["services"]["deployflag"]
    env = service["environment"]
    assert env["DEPLOYFLAG_AMQP_URL"].startswith("amqp://")
    assert "@rabbitmq:5672/" in env["DEPLOYFLAG_AMQP_URL"]
    assert env["DEPLOYFLAG_DATABASE_URL"].startswith("postgresql+asyncpg://")
    assert "@postgres:5432/" in env["DEPLOYFLAG_DATABASE_URL"]
    assert compose["services"]["migrate"]["environment"] == env
    # the health port on loopback only
    assert (
        "127.0.0.1:${DEPLOYFLAG_PORT:-8080}:8080" in service["ports"]
    )  # the health port on loopback only
    assert service["mem_limit"]
    assert service["ulimits"]["nofile"]["soft"] >= 4096
    broker_args = compose["services"]["rabbitmq"]["environment"][
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"
    ]
    assert "max_message_size 67108864" in broker_args  # the broker-side size limit
    grace = service["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) > 60, "must exceed DEPLOYFLAG_DRAIN_TIMEOUT (60 s)"
    # RabbitMQ's guest account only works from localhost: the broker needs a real user.
    rabbit_env = compose["services"]["rabbitmq"]["environment"]
    assert "RABBITMQ_DEFAULT_USER" in rabbit_env


# --- Cloud Build ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tags"),
    [
        ("cloudbuild_depl_dev.yaml", ["${BRANCH_NAME}"]),
        ("cloudbuild_depl.yaml", ["${TAG_NAME}", "${SHORT_SHA}"]),
    ],
)
def test_cloud_build_uses_kaniko_on_the_dockerfile(name: str, tags: list[str]) -> None:
    config = yaml.safe_load((ROOT / name).read_text(encoding="utf-8"))
    assert config["timeout"] == "1800s"
    (step,) = config["steps"]
    assert step["name"].startswith("gcr.io/kaniko-project/executor")
    args = step["args"]
    assert "--dockerfile=docker/Dockerfile" in args
    prefix = "--destination="
    destinations = [a.removeprefix(prefix) for a in args if a.startswith(prefix)]
    assert [d.rpartition(":")[2] for d in destinations] == tags
    assert all(d.startswith("${_IMAGE}:") for d in destinations)
    assert "_IMAGE" in config["substitutions"]


def _unit_values() -> dict[str, str]:
    text = (ROOT / "docker" / "deployflag.service").read_text()
    values = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def test_the_unit_survives_a_30_minute_broker_or_database_outage() -> None:
    from deployflag.settings import load_settings

    unit = _unit_values()
    settings = load_settings()
    restart = float(unit["RestartSec"])
    window, burst = float(unit["StartLimitIntervalSec"]), int(unit["StartLimitBurst"])
    assert window >= 1800
    # The quickest failing start during an outage: the broker wait (the database wait is longer)
    quickest = min(settings.broker_connect_timeout, settings.database_connect_timeout) + restart
    assert window / quickest < burst, "systemd would give up during the outage"
    assert int(unit["LimitNOFILE"]) >= 4096
    assert unit["MemoryMax"]
