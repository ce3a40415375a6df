"""Poison messages against `serve` on the real RabbitMQ: each is parked, none wedges the queue.

Every kind is published (with aiormq and overridden pamqp encoders, as other clients send them)
ahead of a valid request; the valid request must be answered, the poison message parked once
with the right reason, and the log must stay short.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from pamqp import encode

from tests.support.broker import ServiceProcess, Upstream
from tests.support.poison import PoisonKind, kinds, raw_publisher
from tests.support.toolkit import Names

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
WORKED = (ROOT / "examples" / "worked-example.json").read_bytes()
KINDS = {kind.name: kind for kind in kinds()}


def error_lines(service: ServiceProcess) -> int:
    return sum(1 for line in service.log_lines() if line.get("level") in ("error", "critical"))


@pytest.mark.parametrize("name", list(KINDS))
async def test_a_poison_message_is_parked_and_the_request_behind_it_answered(
    name: str,
    start_service: Callable[..., ServiceProcess],
    service_env: dict[str, str],
    upstream: Upstream,
    rabbit_url: str,
    names: Names,
) -> None:
    kind: PoisonKind = KINDS[name]
    service = start_service(service_env)
    # Given a poison message ahead of a valid request
    async with raw_publisher(rabbit_url, names) as publish:
        await publish(kind.body or WORKED, kind.properties(kind.request_id))
    valid_id = f"valid-{uuid.uuid4().hex[:8]}"
    await upstream.publish(WORKED, message_id=valid_id)
    # Then the valid request is answered
    [reply] = await upstream.drain("save_result", 1, timeout=90)
    assert reply.correlation_id == valid_id
    assert orjson.loads(reply.body)["scores"][0]["issue_weight"] == 95  # forecast scoring
    # And the poison message is parked once, with its reason, and its cause said
    [parked] = await upstream.drain("failed", 1, timeout=30)
    headers = parked.headers
    assert headers["x-deployflag-reason"] == kind.reason, headers.get("x-deployflag-error")
    assert parked.body == (kind.body or WORKED)
    error = str(headers["x-deployflag-error"])
    if name == "negative_int_header" and _encodes_negative_octets():  # pamqp >= 4
        assert headers["n"] == -1
        assert "x-deployflag-altered-headers" not in headers
    elif name == "negative_int_header":  # pamqp 3 encodes -1 as an unsigned octet: altered
        assert headers["n"] == "-1"
        assert headers["x-deployflag-altered-headers"] == "n"
    elif name == "invalid_utf8_long_string_header":
        assert headers["s"] == "\\xff\\xfe"
        assert headers["x-deployflag-altered-headers"] == "s"
    elif name == "headers_131_kb":
        assert "big" not in headers
        assert str(headers["x-deployflag-original-headers"]).startswith("{'big': 'xxx")
    elif name == "non_utf8_message_id":
        assert "message_id: UnicodeDecodeError" in error
        assert "raw: id-\\xff\\xfe" in error
    elif name == "non_utf8_header_key":
        assert "headers: UnicodeDecodeError" in error
    elif name == "timestamp_2_63":
        assert "timestamp:" in error
    elif name == "headers_600_deep":
        assert "headers: RecursionError" in error
    assert await upstream.count("training") == 0
    # And the log stays short: no error line per retry
    assert error_lines(service) < 10
    assert service.stop() == 0


def _encodes_negative_octets() -> bool:
    try:
        encode.field_table({"n": -1})
    except Exception:
        return False
    return True
