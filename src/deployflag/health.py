"""What the service knows about its own health, and the task that watches the event loop.

Liveness — is the event loop still turning? — cannot be answered by a loop that is stuck: a
handler that would say "stalled" never runs. So liveness rests on two facts instead:

* :func:`monitor_loop` wakes every ``interval`` and stamps ``Health.last_tick``. A loop that is
  blocked right now answers no HTTP request at all; the health-checker's request times out, and
  every checker (Docker, Kubernetes, ``deployflag healthcheck``) counts a timeout as a failure.
  The systemd watchdog ping runs in the same loop, so it stops too.
* A loop that was blocked and has just come back serves the requests that waited. Whether such a
  handler runs before the monitor's next tick (``last_tick`` older than the bound) or just after it
  (``last_lag`` above the bound), it answers 503: the check that was in flight during the stall
  reports it, even when the checker's timeout was long enough to get an answer. The next check,
  one monitor interval later, sees a healthy loop again.

Readiness is the conjunction of the parts the service sets: consumer attached, database answered,
worker pool alive, and not draining.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployflag import logs

if TYPE_CHECKING:
    from deployflag.metrics import Metrics
    from deployflag.settings import Settings

_log = logs.get_logger("deployflag.health")

# About a minute of samples at the default 0.1 s interval: enough for a p99 and a recent maximum.
LAG_WINDOW = 600


@dataclass
class Health:
    """Mutable state the service updates; the HTTP handlers and the watchdog read it."""

    consumer_ready: bool = False
    database_ok: bool = False
    pool_alive: bool = False
    draining: bool = False
    stall_seconds: float = 10.0
    last_tick: float = field(default_factory=time.monotonic)
    last_lag: float = 0.0
    _lags: deque[float] = field(default_factory=lambda: deque(maxlen=LAG_WINDOW), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Health:
        return cls(stall_seconds=settings.loop_stall_seconds)

    # --- event loop ---------------------------------------------------------------------------
    def record_tick(self, now: float, lag: float) -> None:
        self.last_tick = now
        self.last_lag = lag
        self._lags.append(lag)

    def seconds_since_tick(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_tick

    def alive(self, now: float | None = None) -> bool:
        """True while the monitor ticks within the stall bound and its last lag stayed below it."""
        return (
            self.seconds_since_tick(now) <= self.stall_seconds
            and self.last_lag <= self.stall_seconds
        )

    def lag_max(self) -> float:
        """The largest lag among the recent samples (0 before the first)."""
        return max(self._lags, default=0.0)

    def lag_p99(self) -> float:
        """The 99th percentile of the recent lag samples (nearest rank; 0 before the first)."""
        if not self._lags:
            return 0.0
        ordered = sorted(self._lags)
        rank = max(0, -(-99 * len(ordered) // 100) - 1)  # ceil(0.99 n) - 1
        return ordered[rank]

    # --- readiness ----------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``(ready, body)``; the body names each check so an operator sees what is missing.

        ``checks.draining`` is the state itself: ``true`` means the service is shutting down.
        """
        checks = {
            "consumer": self.consumer_ready,
            "database": self.database_ok,
            "pool": self.pool_alive,
            "draining": self.draining,
        }
        ready = self.consumer_ready and self.database_ok and self.pool_alive and not self.draining
        return ready, {"ready": ready, "checks": checks}


def mark_database(
    health: Health, metrics: Metrics | None, *, ok: bool, error: str | None = None
) -> None:
    """The one place that flips the database's health (readiness, the gauge, one log line per
    change): the idle watcher and the handler's retries both report here."""
    if metrics is not None:
        metrics.database_ok.set(1 if ok else 0)
    if ok == health.database_ok:
        return
    health.database_ok = ok
    if ok:
        _log.info("database reachable")
    else:
        _log.warning("database unreachable", error=error)


async def monitor_loop(health: Health, metrics: Metrics | None, interval: float = 0.1) -> None:
    """Sleep ``interval`` forever, measuring how late each wake-up is; cancel to stop.

    The lag is what every other callback in the loop suffered at that moment: time spent in
    CPU-bound code, blocking calls, or a long chain of ready callbacks.
    """
    if interval <= 0:
        raise ValueError("interval must be positive")
    expected = time.monotonic() + interval
    health.record_tick(time.monotonic(), 0.0)
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        lag = max(0.0, now - expected)
        health.record_tick(now, lag)
        if metrics is not None:
            metrics.observe_loop_lag(lag, health.lag_max())
        expected = now + interval
