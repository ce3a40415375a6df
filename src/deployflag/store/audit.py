"""Read-only views of the request table for operators, and the park history kept by replays.

``requests show`` reads from here; ``failed replay`` writes the park history before it sends a
request back to training (the request's own row forgets its reason and error once it is claimed
again, so the history keeps them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from deployflag.redaction import redact
from deployflag.store.tables import (
    REASON_LENGTH,
    ModelPerformanceMetadata,
    RequestPark,
    TrainingRequest,
)

MAX_ERROR_LENGTH = 10_000

_requests: Table = TrainingRequest.__table__  # type: ignore[assignment]
_metadata: Table = ModelPerformanceMetadata.__table__  # type: ignore[assignment]
_parks: Table = RequestPark.__table__  # type: ignore[assignment]

# The request table's "pending" means a worker claimed it; operators read "claimed".
STATUS_NAMES = {"pending": "claimed", "done": "done", "parked": "parked"}


@dataclass(frozen=True)
class ParkRecord:
    parked_at: datetime
    reason: str | None
    error: str | None
    replay_count: int
    replayed_at: datetime | None


@dataclass(frozen=True)
class ModelSummary:
    trained: bool | None
    skipped_reason: str | None
    estimator: str | None
    roc_auc: float | None
    precision: float | None
    training_rows: int | None
    training_seconds: float | None


@dataclass(frozen=True)
class RequestReport:
    """What the database knows about one request."""

    request_id: str
    repo_id: str | None
    status: str
    attempts: int
    outcome: str
    reason: str | None
    error: str | None
    first_seen: datetime
    finished_at: datetime | None
    updated_at: datetime
    result_stored: bool
    model: ModelSummary | None
    parks: list[ParkRecord] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in list(data.items()):
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        for park in data["parks"]:
            for key in ("parked_at", "replayed_at"):
                if park[key] is not None:
                    park[key] = park[key].isoformat()
        return data


def _outcome(status: str, reason: str | None) -> str:
    if status == "done":
        return "answered"
    if status == "parked":
        return f"parked ({reason})" if reason else "parked"
    return "in progress or interrupted (claimed, not finished)"


def _model_summary(result: Any, metadata: Any) -> ModelSummary | None:
    model = result.get("model") if isinstance(result, dict) else None
    if not isinstance(model, dict) and metadata is None:
        return None
    model = model if isinstance(model, dict) else {}

    def pick(key: str, column: str) -> Any:
        if metadata is not None and getattr(metadata, column) is not None:
            return getattr(metadata, column)
        return model.get(key)

    return ModelSummary(
        trained=model.get("trained"),
        skipped_reason=model.get("skipped_reason"),
        estimator=model.get("estimator"),
        roc_auc=pick("roc_auc", "roc_auc"),
        precision=pick("precision", "precision_score"),
        training_rows=pick("training_rows", "number_of_training_data_rows"),
        training_seconds=pick("training_seconds", "training_time"),
    )


def _report_query() -> Any:
    r, m = _requests, _metadata
    return select(
        r,
        m.c.roc_auc,
        m.c.precision_score,
        m.c.number_of_training_data_rows,
        m.c.training_time,
        m.c.id.label("metadata_id"),
    ).outerjoin(m, m.c.request_id == r.c.request_id)


def _to_report(row: Any, parks: list[ParkRecord]) -> RequestReport:
    metadata = row if row.metadata_id is not None else None
    return RequestReport(
        request_id=row.request_id,
        repo_id=row.repo_id,
        status=STATUS_NAMES.get(row.status, row.status),
        attempts=row.attempts,
        outcome=_outcome(row.status, row.reason),
        reason=row.reason,
        error=row.error,
        first_seen=row.received_at,
        finished_at=row.finished_at,
        updated_at=row.updated_at,
        result_stored=row.result is not None,
        model=_model_summary(row.result, metadata),
        parks=parks,
    )


async def _parks_of(conn: Any, request_ids: list[str]) -> dict[str, list[ParkRecord]]:
    found: dict[str, list[ParkRecord]] = {rid: [] for rid in request_ids}
    if not request_ids:
        return found
    rows = await conn.execute(
        select(_parks).where(_parks.c.request_id.in_(request_ids)).order_by(_parks.c.parked_at)
    )
    for p in rows:
        found[p.request_id].append(
            ParkRecord(p.parked_at, p.reason, p.error, p.replay_count, p.replayed_at)
        )
    return found


async def request_report(engine: AsyncEngine, request_id: str) -> RequestReport | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(_report_query().where(_requests.c.request_id == request_id))
        ).first()
        if row is None:
            return None
        parks = await _parks_of(conn, [request_id])
    return _to_report(row, parks[request_id])


async def recent_requests(engine: AsyncEngine, repo_id: str, last: int) -> list[RequestReport]:
    """The repository's ``last`` requests, newest first."""
    query = (
        _report_query()
        .where(_requests.c.repo_id == repo_id)
        .order_by(_requests.c.received_at.desc(), _requests.c.id.desc())
        .limit(last)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
        parks = await _parks_of(conn, [row.request_id for row in rows])
    return [_to_report(row, parks[row.request_id]) for row in rows]


# --- the park history, written by replays ---------------------------------------------------


def _insert(engine: AsyncEngine, table: Table) -> Any:
    return pg_insert(table) if engine.dialect.name == "postgresql" else sqlite_insert(table)


async def note_park(
    engine: AsyncEngine,
    *,
    request_id: str,
    repo_id: str | None,
    reason: str | None,
    error: str | None,
    parked_at: datetime,
    replay_count: int,
) -> bool:
    """Keep the park before its replay; True when an earlier run already confirmed the replay
    of this very park (then it must not be published again)."""
    values = {
        "request_id": request_id,
        "repo_id": repo_id,
        "reason": None if reason is None else reason[:REASON_LENGTH],
        "error": None if error is None else redact(error)[:MAX_ERROR_LENGTH],
        "parked_at": parked_at,
        "replay_count": replay_count,
    }
    insert = (
        _insert(engine, _parks)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[_parks.c.request_id, _parks.c.parked_at])
    )
    async with engine.begin() as conn:
        await conn.execute(insert)
        replayed = await conn.scalar(
            select(_parks.c.replayed_at).where(
                _parks.c.request_id == request_id, _parks.c.parked_at == parked_at
            )
        )
    return replayed is not None


async def mark_replayed(
    engine: AsyncEngine, *, request_id: str, parked_at: datetime, at: datetime
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            _parks.update()
            .where(_parks.c.request_id == request_id, _parks.c.parked_at == parked_at)
            .values(replayed_at=at)
        )
