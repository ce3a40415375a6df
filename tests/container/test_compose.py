"""docker/compose.yaml really comes up: podman-compose with locally built stand-ins for the
RabbitMQ, PostgreSQL and Prometheus images, to a reply to a request and a scrape by the
monitoring profile's Prometheus, and down again.

podman-compose (on podman 4.3) ignores `condition: service_healthy` and stumbles over a
dependency on a finished one-shot container, so the services are started in compose's order
by hand (`--no-deps`), each after the health checks of what it depends on pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.container.support import build_compose_images, logs, podman, wait_healthy
from tests.support.toolkit import free_port, wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()


class Compose:
    def __init__(self, project: str) -> None:
        self.project = project
        self.env = {
            **os.environ,
            "DEPLOYFLAG_PORT": str(free_port()),
            "RABBITMQ_UI_PORT": str(free_port()),
            "PROMETHEUS_PORT": str(free_port()),
        }

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "podman_compose", "-f", str(COMPOSE), "-p", self.project,
                   "--profile", "monitoring"]  # fmt: skip
        done = subprocess.run(
            [*command, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"podman-compose {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def containers(self) -> list[str]:
        listing = podman(
            "ps", "-a", "--filter", f"label=io.podman.compose.project={self.project}",
            "--format", "{{.Names}}",
        ).stdout  # fmt: skip
        return listing.split()


@pytest.fixture(scope="module")
def compose_images() -> None:
    build_compose_images()


@pytest.fixture
def compose(compose_images: None) -> Iterator[Compose]:
    project = f"dftest{uuid.uuid4().hex[:8]}"
    stack = Compose(project)
    try:
        yield stack
    finally:
        subprocess.run(
            [sys.executable, "-m", "podman_compose", "-f", str(COMPOSE), "-p", project,
             "--profile", "monitoring", "down", "-v"],
            env=stack.env, capture_output=True, timeout=300, check=False,
        )  # fmt: skip


def prometheus_value(api: str, expr: str) -> str | None:
    url = f"{api}/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result = orjson.loads(response.read())["data"]["result"]
    except OSError:
        return None
    return str(result[0]["value"][1]) if result else None


def test_compose_comes_up_answers_a_request_and_goes_down(compose: Compose) -> None:
    # Given the broker and the database up and healthy
    compose("up", "-d", "--no-build", "--no-deps", "rabbitmq", "postgres")
    wait_healthy(compose.container("rabbitmq"), timeout=180)
    wait_healthy(compose.container("postgres"), timeout=120)
    # And the schema migrated by the one-shot migrate service
    compose("up", "-d", "--no-build", "--no-deps", "migrate")
    migrate = compose.container("migrate")
    code = podman("wait", migrate, timeout=180).stdout.strip()
    assert code == "0", logs(migrate)
    # When the service starts and its health check passes
    compose("up", "-d", "--no-build", "--no-deps", "deployflag")
    service = compose.container("deployflag")
    wait_healthy(service, timeout=180)
    # Then a request submitted inside the stack gets its reply
    done = subprocess.run(
        ["podman", "exec", "-i", service, "python", "-m", "deployflag", "submit", "-", "--wait",
         "--timeout", "120"],
        input=WORKED, capture_output=True, timeout=200, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode() + logs(service)
    replies = [orjson.loads(line) for line in done.stdout.splitlines() if line.startswith(b"{")]
    assert [r["scores"][0]["issue_weight"] for r in replies] == [95], done.stdout
    # And the service's user is not root
    assert podman("exec", service, "id", "-u").stdout.strip() == "10001"
    # When the monitoring profile's Prometheus starts, it scrapes the service by its compose name
    compose("up", "-d", "--no-build", "--no-deps", "prometheus")
    api = f"http://127.0.0.1:{compose.env['PROMETHEUS_PORT']}/api/v1"
    wait_until(
        lambda: prometheus_value(api, 'deployflag_consumer_ready{job="deployflag"}') == "1",
        120,
        "Prometheus in the stack to scrape deployflag",
        every=1.0,
    )
    rules = orjson.loads(urllib.request.urlopen(f"{api}/rules", timeout=5).read())
    assert len([r for g in rules["data"]["groups"] for r in g["rules"]]) == 9  # alerts.yml
    # When the stack goes down, nothing of it is left
    compose("down", "-v", timeout=300)
    assert compose.containers() == []
