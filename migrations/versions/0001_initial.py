"""The initial schema: the original's three metadata tables plus the request table.

Revision ID: 0001
Revises:
Create Date: 2025-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from deployflag.store.tables: a migration must keep describing
# the schema as it was at this revision, whatever the models become. Names go through op.f() so
# that env.py's naming convention is not applied to them a second time.
ID = sa.String(255)
VERSION = sa.String(255)


def timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "model_framework",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", VERSION, nullable=False),  # "<estimator>:<scikit-learn version>"
        sa.Column("model_name", VERSION, nullable=False),
        sa.Column("model_version", VERSION, nullable=False),
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_framework")),
        sa.UniqueConstraint("version", name=op.f("uq_model_framework_version")),
    )
    op.create_table(
        "grid_search_parameter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", VERSION, nullable=False),  # ModelSpec.grid_version
        sa.Column("objective", VERSION, nullable=False),
        sa.Column("eval_metric", VERSION, nullable=False),
        sa.Column("parameters", sa.Text(), nullable=False),  # JSON: grid, cv_folds, random_state
        timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grid_search_parameter")),
        sa.UniqueConstraint("version", name=op.f("uq_grid_search_parameter_version")),
    )
    op.create_table(
        "model_performance_metadata",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repo_id", ID, nullable=False),
        sa.Column("precision_score", sa.Double(), nullable=True),
        sa.Column("roc_auc", sa.Double(), nullable=True),
        sa.Column("training_time", sa.Double(), nullable=False),  # seconds
        sa.Column("number_of_training_data_rows", sa.Integer(), nullable=False),
        sa.Column("w1_daily_weighted_fix_rate", sa.Double(), nullable=False),
        sa.Column("w2_historical_weighted_fix_rate", sa.Double(), nullable=False),
        sa.Column("w3_fix_probability", sa.Double(), nullable=False),
        sa.Column("w4_severity", sa.Double(), nullable=False),
        timestamp("last_training"),
        sa.Column("model_framework_id", sa.Integer(), nullable=False),
        sa.Column("grid_search_model_parameters_id", sa.Integer(), nullable=False),
        sa.Column("deployflag_version", sa.String(64), nullable=False),
        timestamp("created_at"),
        sa.Column("request_id", ID, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_performance_metadata")),
        sa.ForeignKeyConstraint(
            ["model_framework_id"],
            ["model_framework.id"],
            name=op.f("fk_model_performance_metadata_model_framework_id"),
        ),
        sa.ForeignKeyConstraint(
            ["grid_search_model_parameters_id"],
            ["grid_search_parameter.id"],
            name=op.f("fk_model_performance_metadata_grid_search_model_parameters_id"),
        ),
    )
    op.create_index(
        op.f("ix_model_performance_metadata_request_id"),
        "model_performance_metadata",
        ["request_id"],
        unique=True,  # one metadata row per request
    )
    op.create_table(
        "training_request",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", ID, nullable=False),
        sa.Column("repo_id", ID, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("result", sa.Text(), nullable=True),  # the published result, JSON
        sa.Column("reason", sa.String(64), nullable=True),  # short code when parked
        sa.Column("error", sa.Text(), nullable=True),
        timestamp("received_at"),
        timestamp("finished_at", nullable=True),
        timestamp("updated_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_request")),
        sa.UniqueConstraint("request_id", name=op.f("uq_training_request_request_id")),
        sa.CheckConstraint(
            "status IN ('pending', 'done', 'parked')", name=op.f("ck_training_request_status")
        ),
    )
    op.create_index(op.f("ix_training_request_status"), "training_request", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_training_request_status"), table_name="training_request")
    op.drop_table("training_request")
    op.drop_index(
        op.f("ix_model_performance_metadata_request_id"), table_name="model_performance_metadata"
    )
    op.drop_table("model_performance_metadata")
    op.drop_table("grid_search_parameter")
    op.drop_table("model_framework")
