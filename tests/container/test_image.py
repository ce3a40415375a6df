"""docker/Dockerfile really runs: built with podman on a locally bootstrapped base image, started
beside the test RabbitMQ, healthy, answering, non-root, and draining on SIGTERM."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.container.support import build_image, logs, podman, remove, wait_healthy
from tests.support.broker import Names, Upstream
from tests.support.toolkit import free_port

pytestmark = [pytest.mark.container, pytest.mark.rabbitmq, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
SAMPLE = (ROOT / "examples" / "sample-request.json").read_bytes()


@pytest.fixture(scope="session")
def image() -> str:
    return build_image()


@pytest.fixture
def container(image: str, rabbit_url: str, names: Names) -> Iterator[str]:
    name = f"deployflag-test-{uuid.uuid4().hex[:8]}"
    env = {
        **names.env(),
        "DEPLOYFLAG_AMQP_URL": rabbit_url,  # the test broker on the host's loopback
        "DEPLOYFLAG_HTTP_HOST": "127.0.0.1",
        "DEPLOYFLAG_HTTP_PORT": str(free_port()),
        "DEPLOYFLAG_WORKERS": "1",
        "DEPLOYFLAG_DRAIN_TIMEOUT": "60",
    }
    flags = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
    podman("run", "-d", "--name", name, "--network", "host", *flags, image)
    try:
        yield name
    finally:
        remove(name)


def test_the_image_runs_as_a_non_root_user(image: str) -> None:
    assert podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == (
        "10001:10001"
    )
    done = podman("run", "--rm", "--network", "none", image, "id", "-u")
    assert done.stdout.strip() == "10001"


async def test_container_is_healthy_answers_and_drains_on_sigterm(
    container: str, upstream: Upstream
) -> None:
    # Given the container running beside the broker, its HEALTHCHECK passing
    wait_healthy(container)
    assert podman("exec", container, "id", "-u").stdout.strip() == "10001"
    # When the upstream sends a request, the reply comes back
    await upstream.publish(WORKED, message_id="container-1")
    [reply] = await upstream.drain("save_result", 1, timeout=120)
    assert reply.correlation_id == "container-1"
    assert (
        orjson.loads(reply.body)["scores"][0]["issue_weight"] == 95
    )  # the worked example, forecast scoring
    # When requests are queued and the container gets SIGTERM
    ids = [f"drain-{i}" for i in range(4)]
    for rid in ids:
        await upstream.publish(SAMPLE, message_id=rid)
    podman("kill", "--signal", "TERM", container)
    code = podman("wait", container, timeout=120).stdout.strip()
    # Then it exits 0, and every request is answered or back on the queue: nothing lost
    assert code == "0", logs(container)
    answered = await upstream.count("save_result")
    waiting = await upstream.count("training")
    assert answered + waiting == len(ids), logs(container)
    assert await upstream.count("failed") == 0
