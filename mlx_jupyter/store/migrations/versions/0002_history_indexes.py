"""Indexes for the history filters: by notebook, by status, and the unfiltered newest-first list.

Without them `list_requests(notebook=...)`, `list_requests(status=...)`, start-up recovery
(status IN queued/running) and the plain history page sort or scan the whole table.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-26
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_requests_notebook_created", "requests", ["notebook", "created_at"])
    op.create_index("ix_requests_status_created", "requests", ["status", "created_at"])
    op.create_index("ix_requests_created", "requests", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_requests_created", table_name="requests")
    op.drop_index("ix_requests_status_created", table_name="requests")
    op.drop_index("ix_requests_notebook_created", table_name="requests")
