"""Record which scoring produced a result, its recency half-life and its model blend.

Rows written before this revision were computed by the seed scoring, hence its server default.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "model_performance_metadata"


def upgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(sa.Column("scoring", sa.String(16), nullable=False, server_default="seed"))
        batch.add_column(sa.Column("half_life_days", sa.Double(), nullable=True))
        batch.add_column(sa.Column("blend_weight", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_column("blend_weight")
        batch.drop_column("half_life_days")
        batch.drop_column("scoring")
