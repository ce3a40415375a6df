"""Podman for the container tests: the base image, the deployflag image, containers and their
health checks. Everything here is local: no registry is reachable or needed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.toolkit import wait_until

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/deployflag:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT = 900.0


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        pytest.fail(
            "podman not found: run `scripts/services.sh containers` (make test-container does)"
        )
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def build_args() -> list[str]:
    """`--format docker` keeps HEALTHCHECK; host network and the host's CA bundle let pip
    inside the build reach the package index as the host does."""
    args = ["--format", "docker", "--network", "host"]
    if CA_BUNDLE.is_file():
        args += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    return args


def ensure_base_image() -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "base-image.sh"), BASE_IMAGE],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"base image: {done.stdout}{done.stderr}", pytrace=False)


def build_image(tag: str = IMAGE) -> str:
    ensure_base_image()
    podman(
        "build", *build_args(), "--build-arg", f"PYTHON_IMAGE={BASE_IMAGE}",
        "-f", str(ROOT / "docker" / "Dockerfile"), "-t", tag, str(ROOT),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    return tag


def healthy(name: str) -> bool:
    """Run the image's HEALTHCHECK once (no systemd here: podman never runs it on a timer)."""
    return podman("healthcheck", "run", name, check=False, timeout=60).returncode == 0


def wait_healthy(name: str, timeout: float = 120) -> None:
    def check() -> bool:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        if state not in ("running", "created", "configured"):
            raise AssertionError(f"{name} is {state}:\n{logs(name)}")
        return healthy(name)

    wait_until(check, timeout, f"{name}'s health check to pass", every=1.0)


def logs(name: str) -> str:
    done = podman("logs", name, check=False)
    return done.stdout + done.stderr


def remove(name: str) -> None:
    podman("rm", "-f", "-t", "5", name, check=False, timeout=60)


STANDINS = ROOT / "tests" / "container" / "standins"
# The names docker/compose.yaml uses, built locally (podman finds short names in localhost/).
COMPOSE_IMAGES = {
    "rabbitmq": "localhost/rabbitmq:3.13-management",
    "postgres": "localhost/postgres:16",
    "prometheus": "localhost/prom/prometheus:v2.53.0",
}
COMPOSE_DEPLOYFLAG_IMAGE = "localhost/deployflag:local"


def debian_mirror() -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "base-image.sh"), "--mirror"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"no Debian mirror: {done.stderr}", pytrace=False)
    return done.stdout.strip()


def build_compose_images() -> None:
    """The stand-ins for the broker and database images, and the deployflag image under the
    name compose gives it."""
    image = build_image()
    mirror = debian_mirror()
    for service, tag in COMPOSE_IMAGES.items():
        podman(
            "build", *build_args(), "--build-arg", f"BASE={BASE_IMAGE}",
            "--build-arg", f"DEBIAN_MIRROR={mirror}", "-t", tag, str(STANDINS / service),
            timeout=BUILD_TIMEOUT,
        )  # fmt: skip
    podman("tag", image, COMPOSE_DEPLOYFLAG_IMAGE)
