"""Small builders of request rows for the pipeline's unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from deployflag.messages import TrainingRequest, validate_request
from deployflag.pipeline import events, features

START = datetime(2021, 1, 1)
ROOT_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def at(days: float) -> str:
    """ISO text (no offset) `days` after 2021-01-01 00:00."""
    return (START + timedelta(days=days)).isoformat(timespec="microseconds")


def micros(days: float) -> int:
    return events.micros((START + timedelta(days=days)).replace(tzinfo=UTC))


def daily(
    days: float,
    frequency: int,
    *,
    shortcode: str = "PYL-W0611",
    branch: str = "feature-1",
    base: str | None = "a1",
    issue_type: str | None = "Anti-pattern",
    severity: str | None = "major",
) -> dict[str, Any]:
    return {
        "repository_id": 1,
        "run_id": 1,
        "branch_name": branch,
        "base_oid": base,
        "commit_oid": "c",
        "check_id": 1,
        "created_at": at(days),
        "shortcode": shortcode,
        "frequency_detected": frequency,
        "frequency_resolved": 0,
        "issue_type": issue_type,
        "severity": severity,
    }


def hist(
    days: float,
    frequency: int,
    *,
    shortcode: str = "PYL-W0611",
    issue_type: str | None = "Anti-pattern",
    severity: str | None = "major",
) -> dict[str, Any]:
    return {
        "run_id": 1,
        "base_oid": "m",
        "timestamp": at(days),
        "shortcode": shortcode,
        "frequency": frequency,
        "issue_type": issue_type,
        "severity": severity,
    }


def request(
    analysis: list[dict[str, Any]] | None = None, historical: list[dict[str, Any]] | None = None
) -> TrainingRequest:
    return validate_request(
        {"repo_id": 1, "analysis_run": analysis or [], "historical_run": historical or []}
    )


def build_events(req: TrainingRequest) -> events.Events:
    return events.build(events.columns(req))


def build_features(req: TrainingRequest, long_gap_days: int = 20) -> features.Features:
    cols = events.columns(req)
    info = features.shortcode_info(req, cols)
    return features.build(events.build(cols), info, long_gap_days)


def listed(req: TrainingRequest) -> list[tuple[str, int, int, float, str]]:
    """Events as (shortcode, microseconds, frequency_detected, fix_rate, kind), listed order."""
    cols = events.columns(req)
    ev = events.build(cols)
    return [
        (cols.shortcodes[c], t, f, r, "daily" if d else "historical")
        for c, t, f, r, d in zip(
            ev.code.tolist(),
            ev.time.tolist(),
            ev.frequency_detected.tolist(),
            ev.fix_rate.tolist(),
            ev.daily.tolist(),
            strict=True,
        )
    ]


@contextmanager
def one_thread() -> Iterator[None]:
    """One native thread, as in the service's workers. Left alone, OpenMP spins its threads on
    a busy 2-core machine and a 50 ms fit takes seconds."""
    with threadpool_limits(limits=1):
        yield
