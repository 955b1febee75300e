"""A request's figures beside its ttft_ms: queue_ms, total_ms, tokens_per_second and
prompt_tokens_per_second, computed once by the server when the request ends and shown as stored
(contracts.generation.Timings).

Requests finished before this revision get total_ms from their own timestamps (created to
finished); their other figures were never stored and stay null.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

FIGURES = ("queue_ms", "total_ms", "tokens_per_second", "prompt_tokens_per_second")

# Milliseconds from created_at to finished_at, in each backend's own date arithmetic.
ELAPSED_MS = {
    "sqlite": "(julianday(finished_at) - julianday(created_at)) * 86400000.0",
    "postgresql": "EXTRACT(EPOCH FROM (finished_at - created_at)) * 1000.0",
}


def upgrade() -> None:
    for name in FIGURES:
        op.add_column("requests", sa.Column(name, sa.Double(), nullable=True))
    elapsed = ELAPSED_MS[op.get_bind().dialect.name]
    op.execute(f"UPDATE requests SET total_ms = ROUND(CAST({elapsed} AS NUMERIC), 1) "
               f"WHERE finished_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for name in reversed(FIGURES):
            batch.drop_column(name)
