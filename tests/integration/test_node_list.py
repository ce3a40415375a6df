"""`deployflag serve` given a list of broker nodes whose first is down: it starts on the next one.

The cluster itself (a node killed under load) is a fault scenario: tests/faults/test_cluster.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.broker import ServiceProcess, Upstream
from tests.support.toolkit import free_port

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()


async def test_a_node_down_at_start_is_skipped_and_the_next_one_serves(
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    rabbit_url: str,
    upstream: Upstream,
) -> None:
    vhost = rabbit_url.rsplit("/", 1)[1]
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}"  # nothing listens there
    service = start_service(service_env, DEPLOYFLAG_AMQP_URL=f"{down}, {rabbit_url}")

    request_id = str(uuid.uuid4())
    await upstream.publish(WORKED, message_id=request_id)
    [reply] = await upstream.drain("save_result", 1, timeout=60)
    assert reply.correlation_id == request_id

    lines = service.log_lines()
    [start] = [line for line in lines if line.get("event") == "starting"]
    assert start["amqp_nodes"] == 2
    skipped = [
        line for line in lines if line.get("event") == "broker node unreachable; trying the next"
    ]
    assert [line["node"] for line in skipped] == [down.replace("guest:guest@", "guest:***@")]
    assert ":guest@" not in service.log()  # no node's password, in any line
