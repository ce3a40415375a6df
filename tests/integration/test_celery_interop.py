"""Interoperability with a Celery-based upstream, with the real `celery` library as the peer.

The upstream sends with `app.send_task(...)`; deployflag answers with a Celery task message that a
real `celery worker` subprocess executes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.broker import Names, ServiceProcess, Upstream
from tests.support.celery_upstream import TRAINING_TASK, make_app
from tests.support.toolkit import async_wait_until

pytestmark = pytest.mark.rabbitmq
ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    "deployflag_results": [{"issue_shortcode": "PYL-W0611", "issue_weight": 95}],
    "repo_id": 42,
}


@pytest.fixture
def celery_results(service_env: dict[str, str], tmp_path: Path, names: Names) -> Iterator[Path]:
    """A real Celery worker consuming the result queue; yields the folder its task writes to."""
    results = tmp_path / "upstream-results"
    results.mkdir()
    env = {**service_env, "UPSTREAM_RESULTS_DIR": str(results)}
    with (tmp_path / "celery-worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.support.celery_upstream",
                "worker",
                "-Q",
                names.queue("save_result"),
                "--pool",
                "solo",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
                "-l",
                "INFO",
                "-n",
                f"upstream-{names.suffix}@%h",
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield results
        finally:
            # The test has its answer; a graceful Celery shutdown would only cost seconds.
            worker.kill()
            worker.wait(timeout=30)
    log = (tmp_path / "celery-worker.log").read_text()
    assert "Traceback" not in log, log


def received(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


async def test_celery_send_task_is_consumed_and_a_celery_worker_runs_the_result_task(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    celery_results: Path,
    names: Names,
    worked_example: bytes,
) -> None:
    # Given the service and a Celery worker for the upstream's result task
    start_service(service_env)
    # When the upstream sends the task the way it always has
    app = make_app(
        service_env["DEPLOYFLAG_AMQP_URL"],
        names.exchange,
        names.queue("training"),
        names.queue("save_result"),
    )
    try:
        app.send_task(TRAINING_TASK, args=[orjson.loads(worked_example)])
    finally:
        app.close()
    # Then the Celery worker executes store_results_from_deployflag with the right kwargs
    got = await async_wait_until(
        lambda: received(celery_results),
        timeout=90,
        what="the Celery worker to run the result task",
    )
    assert got == [EXPECTED]
    assert await upstream.count("failed") == 0


async def test_celery_protocol_1_body_is_accepted(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    celery_results: Path,
    worked_example: bytes,
) -> None:
    start_service(service_env)
    body = orjson.dumps(
        {
            "task": TRAINING_TASK,
            "id": str(uuid.uuid4()),
            "args": [orjson.loads(worked_example)],
            "kwargs": {},
        }
    )
    await upstream.publish(body)
    got = await async_wait_until(
        lambda: received(celery_results),
        timeout=90,
        what="the Celery worker to run the result task",
    )
    assert got == [EXPECTED]


async def test_kwargs_form_and_json_reply_format_override(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    worked_example: bytes,
) -> None:
    # A Celery request with the payload in kwargs["ocave_date"], answered in JSON when asked to
    start_service(service_env, DEPLOYFLAG_REPLY_FORMAT="json")
    body = orjson.dumps(
        [
            [],
            {"ocave_date": orjson.loads(worked_example)},
            {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
        ]
    )
    await upstream.publish(body, headers={"task": TRAINING_TASK, "id": "celery-kw-1"})
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == "celery-kw-1"
    assert orjson.loads(reply.body)["scores"][0]["issue_weight"] == 95
