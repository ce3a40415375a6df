"""The health and metrics endpoint, served for real on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from aiohttp import web

from deployflag.errors import FatalError
from deployflag.health import Health, monitor_loop
from deployflag.healthcheck import check, readyz_url
from deployflag.http import bound_port, start_http, stop_http
from deployflag.metrics import Metrics
from deployflag.settings import Settings, load_settings
from tests.support.toolkit import free_port


class Endpoint:
    def __init__(self, settings: Settings, health: Health, metrics: Metrics) -> None:
        self.settings, self.health, self.metrics = settings, health, metrics
        self.base = f"http://127.0.0.1:{settings.http_port}"


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    settings = load_settings(http_host="127.0.0.1", http_port=free_port())
    health, metrics = Health.from_settings(settings), Metrics()
    runner = await start_http(settings, health, metrics)
    assert runner is not None
    try:
        yield Endpoint(settings, health, metrics)
    finally:
        await stop_http(runner)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def make_ready(health: Health) -> None:
    health.consumer_ready = health.database_ok = health.pool_alive = True


async def test_healthz_ok_while_the_loop_ticks(
    endpoint: Endpoint, client: aiohttp.ClientSession
) -> None:
    async with client.get(endpoint.base + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_healthz_fails_after_a_stall(
    endpoint: Endpoint, client: aiohttp.ClientSession
) -> None:
    # Given a monitor that last ticked longer ago than the stall bound
    endpoint.health.record_tick(time.monotonic() - endpoint.settings.loop_stall_seconds - 5, 0.0)
    async with client.get(endpoint.base + "/healthz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["status"] == "stalled"
    assert body["seconds_since_tick"] > endpoint.settings.loop_stall_seconds
    # And after it ticks again, on time, it is live again
    endpoint.health.record_tick(time.monotonic(), 0.001)
    async with client.get(endpoint.base + "/healthz") as response:
        assert response.status == 200


async def test_readyz_names_what_is_not_ready(
    endpoint: Endpoint, client: aiohttp.ClientSession
) -> None:
    async with client.get(endpoint.base + "/readyz") as response:
        assert response.status == 503
        assert await response.json() == {
            "ready": False,
            "checks": {"consumer": False, "database": False, "pool": False, "draining": False},
        }

    make_ready(endpoint.health)
    async with client.get(endpoint.base + "/readyz") as response:
        assert response.status == 200
        assert (await response.json())["ready"] is True

    endpoint.health.database_ok = False
    async with client.get(endpoint.base + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["checks"]["database"] is False

    endpoint.health.database_ok = True
    endpoint.health.draining = True
    async with client.get(endpoint.base + "/readyz") as response:
        assert response.status == 503
        assert (await response.json())["checks"]["draining"] is True


async def test_metrics_move_with_the_service(
    endpoint: Endpoint, client: aiohttp.ClientSession
) -> None:
    async with client.get(endpoint.base + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        before = await response.text()
    assert 'deployflag_requests_total{outcome="ok",reason=""} 0.0' in before
    assert "deployflag_consumer_ready 0.0" in before
    assert "process_cpu_seconds_total" in before

    endpoint.metrics.requests.labels(outcome="ok", reason="").inc()
    endpoint.health.consumer_ready = True
    async with client.get(endpoint.base + "/metrics") as response:
        after = await response.text()
    assert 'deployflag_requests_total{outcome="ok",reason=""} 1.0' in after
    assert "deployflag_consumer_ready 1.0" in after


async def test_metrics_speak_openmetrics_when_asked(
    endpoint: Endpoint, client: aiohttp.ClientSession
) -> None:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with client.get(endpoint.base + "/metrics", headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_port_zero_means_off() -> None:
    settings = load_settings(http_port=0)
    assert await start_http(settings, Health(), Metrics()) is None
    await stop_http(None)


async def test_bound_port_is_the_configured_one() -> None:
    settings = load_settings(http_host="127.0.0.1", http_port=free_port())
    runner = await start_http(settings, Health(), Metrics())
    assert runner is not None
    try:
        assert bound_port(runner) == settings.http_port
    finally:
        await stop_http(runner)


async def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(http_host="127.0.0.1", http_port=port)
        with pytest.raises(FatalError) as caught:
            await start_http(settings, Health(), Metrics())
    assert caught.value.exit_code == 78
    assert "DEPLOYFLAG_HTTP_PORT" in str(caught.value)
    assert "address already in use" in str(caught.value)


# --- deployflag healthcheck ------------------------------------------------------------------


async def test_healthcheck_exit_codes(endpoint: Endpoint) -> None:
    err = io.StringIO()
    assert await asyncio.to_thread(check, endpoint.settings, 3.0, stderr=err) == 1
    assert err.getvalue().strip().endswith("503 not ready: consumer, database, pool")
    assert err.getvalue().count("\n") == 1

    make_ready(endpoint.health)
    err = io.StringIO()
    assert await asyncio.to_thread(check, endpoint.settings, 3.0, stderr=err) == 0
    assert err.getvalue() == ""


def test_healthcheck_against_an_unused_port() -> None:
    err = io.StringIO()
    settings = load_settings(http_host="127.0.0.1", http_port=free_port())
    assert check(settings, 3.0, stderr=err) == 1
    assert "cannot connect" in err.getvalue()


def test_healthcheck_with_the_endpoint_off() -> None:
    err = io.StringIO()
    assert check(load_settings(http_port=0), stderr=err) == 1
    assert "DEPLOYFLAG_HTTP_PORT=0" in err.getvalue()


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080/readyz"),
        ("::", "http://[::1]:8080/readyz"),
        ("127.0.0.1", "http://127.0.0.1:8080/readyz"),
        ("::1", "http://[::1]:8080/readyz"),
        ("deployflag.internal", "http://deployflag.internal:8080/readyz"),
    ],
)
def test_healthcheck_connects_to_a_concrete_address(host: str, url: str) -> None:
    assert readyz_url(load_settings(http_host=host, http_port=8080)) == url


# --- a loop that stalls for real, in a thread of its own ----------------------------------------


class ThreadedService:
    """The endpoint and the loop monitor on an event loop in another thread, so the test can
    block that loop while it probes from here."""

    def __init__(self, settings: Settings, health: Health) -> None:
        self.settings, self.health = settings, health
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.monitor: asyncio.Task[None] | None = None

    async def _start(self) -> None:
        self.monitor = asyncio.create_task(monitor_loop(self.health, None, interval=0.05))
        self.runner = await start_http(self.settings, self.health, Metrics())

    async def _stop(self) -> None:
        await stop_http(self.runner)
        if self.monitor is not None:
            self.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.monitor

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def block(self, seconds: float) -> None:
        """Block the service's loop for ``seconds``; return once it is blocked."""
        blocked = threading.Event()

        def stall() -> None:
            blocked.set()
            time.sleep(seconds)

        self.loop.call_soon_threadsafe(stall)
        assert blocked.wait(timeout=5)


@pytest.fixture
def threaded() -> Iterator[ThreadedService]:
    settings = load_settings(http_host="127.0.0.1", http_port=free_port(), loop_stall_seconds=0.3)
    health = Health.from_settings(settings)
    make_ready(health)
    service = ThreadedService(settings, health)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def test_a_blocked_loop_fails_the_healthcheck_by_timeout(threaded: ThreadedService) -> None:
    # Given a ready service
    assert check(threaded.settings, 3.0) == 0
    # When its loop is blocked
    threaded.block(1.0)
    err = io.StringIO()
    # Then the probe gets no answer, which is a failure
    assert check(threaded.settings, 0.3, stderr=err) == 1
    assert "no answer within 0.3 s" in err.getvalue()


def test_the_check_in_flight_during_a_stall_reports_it(threaded: ThreadedService) -> None:
    url = f"http://127.0.0.1:{threaded.settings.http_port}/healthz"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # Given a live loop
    with opener.open(url, timeout=5) as response:
        assert response.status == 200
    # When it stalls past the bound (0.3 s) while a patient probe waits
    threaded.block(1.0)
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(url, timeout=5)
    # Then that probe is answered 503 once the loop is back
    with caught.value as error:
        assert error.code == 503
        assert json.loads(error.read())["status"] == "stalled"
