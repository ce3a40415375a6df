"""What one delivery did, for the metrics and the summary log line: stage durations, retries and
its outcome. The handler reports here; nothing here decides anything."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from datetime import datetime
from enum import StrEnum
from typing import TypeVar

from deployflag import logs
from deployflag.metrics import Metrics

T = TypeVar("T")
log = logs.get_logger("deployflag.handler")


class Outcome(StrEnum):
    """How a delivery ended (the ``outcome`` of the log line and of ``deployflag_requests``)."""

    OK = "ok"  # trained, recorded, answered, acked
    DUPLICATE = "duplicate"  # answered with the stored result of an earlier copy
    PARKED = "parked"  # copied to the failed queue with its reason, acked
    REQUEUED = "requeued"  # handed back to the broker, unsettled or nacked
    ERROR = "error"  # a bug in the service: logged, handed back
    ABANDONED = "abandoned"  # ended before any of the above was decided


# Outcomes that settle a request for good: counted once, with the publish-to-ack time.
FINAL = frozenset({Outcome.OK, Outcome.DUPLICATE, Outcome.PARKED})


class Trace:
    """Stage durations and the outcome of one delivery."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.outcome = Outcome.ABANDONED
        self.reason = ""

    async def timed(self, stage: str, awaitable: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await awaitable
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - start

    def settle(self, outcome: Outcome, reason: str = "") -> None:
        self.outcome, self.reason = outcome, reason

    def retried(self, stage: str) -> None:
        self._metrics.requests.labels(outcome="retried", reason=stage).inc()

    def finish(self, published: datetime | float | None) -> None:
        """Observe the stages, count a final outcome, and log the summary line."""
        total = time.perf_counter() - self.started
        for stage, seconds in self.stages.items():
            self._metrics.stage_seconds.labels(stage=stage).observe(seconds)
        self._metrics.stage_seconds.labels(stage="total").observe(total)
        if self.outcome in FINAL:
            label = self.reason if self.outcome is Outcome.PARKED else ""
            self._metrics.requests.labels(outcome=self.outcome.value, reason=label).inc()
            self._metrics.observe_publish_to_ack(published)
        log.info(
            "request finished",
            outcome=self.outcome.value,
            reason=self.reason or None,
            seconds=round(total, 4),
            **{f"{k}_seconds": round(v, 4) for k, v in self.stages.items()},
        )
