"""A digest of each request's body, so a known id arriving with another body is told apart.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: rows written before this revision have no digest and match any body.
    with op.batch_alter_table("training_request") as batch:
        batch.add_column(sa.Column("body_digest", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_request") as batch:
        batch.drop_column("body_digest")
