"""Optional Sentry: nothing without a DSN; with one, tagged and scrubbed events (kept in memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

from deployflag import sentry
from deployflag.settings import load_settings

DSN = "https://public@sentry.example.invalid/1"


class MemoryTransport(Transport):
    """Keeps every event in a list instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        event = envelope.get_event()
        if event is not None:
            self.events.append(dict(event))


@pytest.fixture
def transport() -> Iterator[MemoryTransport]:
    import sentry_sdk

    memory = MemoryTransport()
    yield memory
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def test_unset_dsn_neither_imports_nor_starts_sentry() -> None:
    # In a fresh interpreter, so another test's import of sentry_sdk cannot hide one here.
    code = (
        "import sys\n"
        "from deployflag import sentry\n"
        "from deployflag.settings import load_settings\n"
        "assert sentry.init_sentry(load_settings()) is False\n"
        "sentry.capture(RuntimeError('x'), request_id='r', repo_id=1)\n"
        "sentry.flush()\n"
        "assert 'sentry_sdk' not in sys.modules, 'sentry_sdk was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if "SENTRY" not in k}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_events_are_tagged_with_the_request(transport: MemoryTransport) -> None:
    # Given Sentry started with a DSN
    assert sentry.init_sentry(load_settings(sentry_dsn=DSN), transport=transport) is True
    assert sentry.enabled()

    # When a request fails
    try:
        raise RuntimeError("cannot reach amqp://deployflag:hunter2@rabbit:5672/")
    except RuntimeError as exc:
        sentry.capture(exc, request_id="req-42", repo_id=12860)
    sentry.flush()

    # Then one event carries the request's tags, the release, and no password
    assert len(transport.events) == 1
    event = transport.events[0]
    assert event["tags"]["request_id"] == "req-42"
    assert event["tags"]["repo_id"] == "12860"
    assert event["release"].startswith("deployflag@")
    value = event["exception"]["values"][0]["value"]
    assert "hunter2" not in value
    assert "amqp://deployflag:***@rabbit:5672/" in value
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    assert all("vars" not in frame for frame in frames)
    assert "user" not in event  # no PII


def test_tags_do_not_leak_between_captures(transport: MemoryTransport) -> None:
    sentry.init_sentry(load_settings(sentry_dsn=DSN), transport=transport)
    sentry.capture(ValueError("first"), request_id="a", repo_id=1)
    sentry.capture(ValueError("second"), request_id=None, repo_id=None)
    sentry.flush()
    assert [e.get("tags", {}).get("request_id") for e in transport.events] == ["a", None]


def test_dsn_without_the_extra_warns_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentry_sdk", None)  # import sentry_sdk -> ImportError
    with structlog.testing.capture_logs() as logs:
        assert sentry.init_sentry(load_settings(sentry_dsn=DSN)) is False
    assert [entry["event"] for entry in logs] == ["sentry_unavailable"]
    assert "deployflag[sentry]" in logs[0]["detail"]
    assert not sentry.enabled()
