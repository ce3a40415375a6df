"""The metadata tables (docs/database.md), with the original service's table and column names.

Keep this module and ``migrations/versions`` in step: a test compares them after ``upgrade head``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, the same in the ORM and in the migrations (PostgreSQL ≤ 63 chars).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 255  # request ids and repo ids (messages.MAX_ID_LENGTH)
REASON_LENGTH = 64
DIGEST_LENGTH = 64
VERSION_LENGTH = 255
REQUEST_STATUSES = ("pending", "done", "parked")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so the value is stored in UTC and
    the zone is put back on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store timezone-aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JSONText(TypeDecorator[Any]):
    """JSON kept as plain text, so the original's ``SELECT *`` shows it readably everywhere."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelFramework(Base):
    """One row per estimator and library version (``version`` = ``"<estimator>:<sklearn>"``)."""

    __tablename__ = "model_framework"
    __table_args__ = (UniqueConstraint("version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    model_name: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    model_version: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class GridSearchParameter(Base):
    """One row per search definition (``version`` = ``ModelSpec.grid_version``)."""

    __tablename__ = "grid_search_parameter"
    __table_args__ = (UniqueConstraint("version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    objective: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    eval_metric: Mapped[str] = mapped_column(String(VERSION_LENGTH))
    parameters: Mapped[Any] = mapped_column(JSONText())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelPerformanceMetadata(Base):
    """One row per finished request: how the model did and what produced it."""

    __tablename__ = "model_performance_metadata"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    precision_score: Mapped[float | None] = mapped_column(Double())
    roc_auc: Mapped[float | None] = mapped_column(Double())
    training_time: Mapped[float] = mapped_column(Double())  # seconds
    number_of_training_data_rows: Mapped[int] = mapped_column(Integer)
    w1_daily_weighted_fix_rate: Mapped[float] = mapped_column(Double())
    w2_historical_weighted_fix_rate: Mapped[float] = mapped_column(Double())
    w3_fix_probability: Mapped[float] = mapped_column(Double())
    w4_severity: Mapped[float] = mapped_column(Double())
    last_training: Mapped[datetime] = mapped_column(UTCDateTime())
    model_framework_id: Mapped[int] = mapped_column(ForeignKey("model_framework.id"))
    grid_search_model_parameters_id: Mapped[int] = mapped_column(
        ForeignKey("grid_search_parameter.id")
    )
    deployflag_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    request_id: Mapped[str] = mapped_column(String(ID_LENGTH), unique=True, index=True)
    # Which scoring computed the weights ("seed" for rows older than the column), and the
    # forecast scoring's recency half-life (null: none) and model blend (null under seed).
    scoring: Mapped[str] = mapped_column(String(16), server_default="seed")
    half_life_days: Mapped[float | None] = mapped_column(Double())
    blend_weight: Mapped[float | None] = mapped_column(Double())


class TrainingRequest(Base):
    """Every request seen, for de-duplication and audit."""

    __tablename__ = "training_request"
    __table_args__ = (
        UniqueConstraint("request_id"),
        CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in REQUEST_STATUSES)), name="status"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    repo_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    status: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[Any | None] = mapped_column(JSONText())
    reason: Mapped[str | None] = mapped_column(String(REASON_LENGTH))
    error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # SHA-256 (hex) of the body that first claimed this request id; NULL before revision 0003.
    body_digest: Mapped[str | None] = mapped_column(String(DIGEST_LENGTH))


class RequestPark(Base):
    """One row per time a request was parked and then replayed from the failed queue.

    A replay moves the request back to ``pending`` and clears its reason and error, so the park
    is copied here first; the row also records whether the republished copy was confirmed, so a
    replay interrupted after the confirm does not publish the request a second time.
    """

    __tablename__ = "training_request_park"
    __table_args__ = (UniqueConstraint("request_id", "parked_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    request_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    repo_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    reason: Mapped[str | None] = mapped_column(String(REASON_LENGTH))
    error: Mapped[str | None] = mapped_column(Text)
    parked_at: Mapped[datetime] = mapped_column(UTCDateTime())
    replay_count: Mapped[int] = mapped_column(Integer)
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
