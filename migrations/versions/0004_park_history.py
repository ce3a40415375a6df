"""The history of parks: one row per park that `deployflag failed replay` sent back to training.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(255)


def timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "training_request_park",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", ID, nullable=False),
        sa.Column("repo_id", ID, nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        timestamp("parked_at"),
        sa.Column("replay_count", sa.Integer(), nullable=False),  # the replay this row led to
        timestamp("replayed_at", nullable=True),  # set once the republished copy was confirmed
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_request_park")),
        sa.UniqueConstraint(
            "request_id", "parked_at", name=op.f("uq_training_request_park_request_id")
        ),
    )
    op.create_index(
        op.f("ix_training_request_park_request_id"), "training_request_park", ["request_id"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_training_request_park_request_id"), table_name="training_request_park")
    op.drop_table("training_request_park")
