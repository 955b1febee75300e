"""The index of the database queue claim goes: the queue admits requests in memory and the
database only records them, so nothing asks it for a model's next queued request any more, and
every insert and status change kept the index up to date for nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.drop_index("ix_requests_queue", table_name="requests")


def downgrade() -> None:
    op.create_index("ix_requests_queue", "requests",
                    ["model_id", "status", sa.text("priority DESC"), "created_at"])
