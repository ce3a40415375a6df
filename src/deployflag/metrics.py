"""Prometheus metrics of one service instance, in a registry of its own.

No metric lives in prometheus_client's global registry: a ``Metrics`` is built per service (and per
test), so two services in one process never collide, and ``/metrics`` shows exactly these series
plus the process collector (CPU, memory, open files of this process).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

# A training request takes from milliseconds (decode, claim) to minutes (a large model fit); the
# job time limit defaults to 9 minutes, so the buckets run from 1 ms to 10 min.
STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# A healthy loop wakes within a millisecond or two; anything past a second hurts heartbeats.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STAGES = ("decode", "claim", "pipeline", "record", "publish", "total")
POOL_REBUILD_CAUSES = ("crash", "time_limit")


def package_version() -> str:
    """The installed deployflag version, or ``0+unknown`` when run from an uninstalled tree."""
    try:
        return version("deployflag")
    except PackageNotFoundError:
        return "0+unknown"


class Metrics:
    """Every series the service exports. Attribute names are what the service calls."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        # The *_created series double every counter and histogram for a timestamp nobody alerts
        # on. The switch is process-wide in prometheus_client; every Metrics wants it off.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        self.requests = Counter(
            "deployflag_requests",
            "Training requests handled, by outcome (ok, parked, retried, duplicate) and reason.",
            ("outcome", "reason"),
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "deployflag_stage_seconds",
            "Seconds per stage of one request (decode, claim, pipeline, record, publish, total).",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.publish_to_ack_seconds = Histogram(
            "deployflag_publish_to_ack_seconds",
            "From the request's AMQP timestamp (set by the publisher) to our ack.",
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "deployflag_in_flight",
            "Requests received and not yet acked.",
            registry=registry,
        )
        self.inline_jobs = Counter(
            "deployflag_inline_jobs",
            "Jobs computed in the service process instead of a worker (small first deliveries "
            "that arrived while nothing else was in flight).",
            registry=registry,
        )
        self.pool_rebuilds = Counter(
            "deployflag_pool_rebuilds",
            "Worker pools replaced, by cause (crash, time_limit).",
            ("cause",),
            registry=registry,
        )
        self.loop_lag_seconds = Histogram(
            "deployflag_event_loop_lag_seconds",
            "How late the event loop woke a timer; sampled every monitor interval.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag_max_seconds = Gauge(
            "deployflag_event_loop_lag_max_seconds",
            "Largest event-loop lag among the recent samples (about the last minute).",
            registry=registry,
        )
        self.consumer_ready = Gauge(
            "deployflag_consumer_ready",
            "1 while the broker consumer is attached to the training queue.",
            registry=registry,
        )
        self.database_ok = Gauge(
            "deployflag_database_ok",
            "1 while the metadata database answered its last check.",
            registry=registry,
        )
        self.broker_blocked = Gauge(
            "deployflag_broker_blocked",
            "1 while the broker blocks this connection (memory or disk alarm): replies wait.",
            registry=registry,
        )
        self.prefetch_window = Gauge(
            "deployflag_prefetch_window",
            "Deliveries the broker may hand this instance unacked: the prefetch, plus the burst "
            "window while it is open.",
            registry=registry,
        )
        self.burst_changes = Counter(
            "deployflag_burst_window_changes",
            "Times the burst window opened or closed, by change (opened, closed).",
            ("change",),
            registry=registry,
        )
        self.burst_handed_back = Counter(
            "deployflag_burst_handed_back",
            "Deliveries the burst consumer received after its window closed, handed back "
            "untouched (nack with requeue) for another consumer.",
            registry=registry,
        )
        self.info = Info("deployflag", "Build information.", registry=registry)
        self.info.info({"version": package_version()})

        # Label sets known in advance start at zero, so rate() and alerts see them from the start.
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for change in ("opened", "closed"):
            self.burst_changes.labels(change=change)
        for cause in POOL_REBUILD_CAUSES:
            self.pool_rebuilds.labels(cause=cause)
        self.requests.labels(outcome="ok", reason="")
        self.requests.labels(outcome="duplicate", reason="")

        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    # --- helpers ------------------------------------------------------------------------------
    def observe_publish_to_ack(
        self, published: datetime | float | None, now: float | None = None
    ) -> None:
        """Record the time from ``published`` (AMQP timestamp: datetime or epoch seconds) to now.

        Messages without a timestamp are skipped; clock skew between machines can make the
        difference negative, which is recorded as zero rather than dropped.
        """
        if published is None:
            return
        if isinstance(published, datetime):
            if published.tzinfo is None:  # AMQP timestamps are UTC seconds
                published = published.replace(tzinfo=UTC)
            published = published.timestamp()
        current = time.time() if now is None else now
        self.publish_to_ack_seconds.observe(max(0.0, current - published))

    def observe_loop_lag(self, lag: float, recent_max: float) -> None:
        self.loop_lag_seconds.observe(lag)
        self.loop_lag_max_seconds.set(recent_max)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition text and its content type, negotiated from an ``Accept`` header.

        Without one (or with plain ``text/plain``) this is the classic text format 0.0.4 that every
        Prometheus version reads; a scraper asking for OpenMetrics gets OpenMetrics.
        """
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
