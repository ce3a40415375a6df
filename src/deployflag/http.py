"""The health and metrics endpoint: ``/healthz``, ``/readyz``, ``/metrics`` (aiohttp).

It runs in the service's own event loop on purpose: ``/healthz`` answering at all is the proof
that the loop turns (see :mod:`deployflag.health`). Every handler is O(1) or, for ``/metrics``,
O(number of series) — nothing here may hold the loop.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from aiohttp import hdrs, web

from deployflag.errors import FatalError
from deployflag.exitcodes import RET_CONFIG
from deployflag.health import Health
from deployflag.http_limits import ConnectionLimits, GuardedTCPSite
from deployflag.metrics import Metrics

if TYPE_CHECKING:
    from deployflag.settings import Settings

HEALTH_KEY = web.AppKey("health", Health)
METRICS_KEY = web.AppKey("metrics", Metrics)

# A scrape or probe in flight when the service stops gets this long to finish.
SHUTDOWN_TIMEOUT = 2.0


async def _healthz(request: web.Request) -> web.Response:
    health = request.app[HEALTH_KEY]
    if health.alive():
        return web.json_response({"status": "ok"})
    body = {
        "status": "stalled",
        "seconds_since_tick": round(health.seconds_since_tick(), 3),
        "last_lag_seconds": round(health.last_lag, 3),
        "stall_seconds": health.stall_seconds,
    }
    return web.json_response(body, status=503)


async def _readyz(request: web.Request) -> web.Response:
    ready, body = request.app[HEALTH_KEY].readiness()
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    health = request.app[HEALTH_KEY]
    metrics = request.app[METRICS_KEY]
    # The gauges mirror Health at scrape time, so the service keeps one source of truth.
    metrics.consumer_ready.set(health.consumer_ready)
    metrics.database_ok.set(health.database_ok)
    body, content_type = metrics.render(request.headers.get(hdrs.ACCEPT, ""))
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: content_type})


def make_app(health: Health, metrics: Metrics) -> web.Application:
    app = web.Application()
    app[HEALTH_KEY] = health
    app[METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_http(settings: Settings, health: Health, metrics: Metrics) -> web.AppRunner | None:
    """Serve the endpoint on ``settings.http_host:http_port``; ``None`` when the port is 0 (off).

    Stop it with :func:`stop_http`. A port that cannot be bound is a :class:`FatalError`
    (exit RET_CONFIG) naming the variables, not a traceback.
    """
    if settings.http_port == 0:
        return None
    # access_log=None: probes every few seconds would drown the service's own log lines.
    runner = web.AppRunner(
        make_app(health, metrics),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    limits = ConnectionLimits(settings.http_max_connections, settings.http_idle_timeout)
    site = GuardedTCPSite(runner, settings.http_host, settings.http_port, limits)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise FatalError(
            f"DEPLOYFLAG_HTTP_HOST/DEPLOYFLAG_HTTP_PORT: cannot listen on "
            f"{settings.http_host}:{settings.http_port}: {reason}",
            RET_CONFIG,
        ) from None
    return runner


async def stop_http(runner: web.AppRunner | None) -> None:
    """Close the listening socket and finish the requests in flight (bounded)."""
    if runner is not None:
        await runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    """The port the endpoint actually listens on (the first socket's)."""
    addresses = runner.addresses
    if not addresses:
        raise RuntimeError("the HTTP endpoint is not listening")
    port = addresses[0][1]
    assert isinstance(port, int)
    return port
