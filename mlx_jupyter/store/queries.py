"""The history's statements, built in one place so the store and the benchmark run the same SQL.

Each is shaped for one index (see schema.py): the planner reads index entries in order and
stops at LIMIT, with no sort and no scan of the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Select, Text, cast, func, select

from .records import TIMING_COLUMNS
from .schema import models_table, requests_table

requests = requests_table.c
models = models_table.c

# The model's name per row, looked up by primary key: keeps the request index driving the plan
# (a join could let the planner start from `models` and sort).
MODEL_NAME = (select(models.name).where(models.id == requests.model_id)
              .scalar_subquery().label("model"))

# History pages leave out the big columns; previews of the first characters stand in for them.
LIST_COLUMNS = (requests.id, MODEL_NAME, requests.notebook, requests.priority, requests.status,
                requests.finish_reason, requests.prompt_tokens, requests.completion_tokens,
                requests.created_at, requests.started_at, requests.finished_at, requests.error,
                *(requests[name] for name in TIMING_COLUMNS))


def history_filters(model_id: int | None = None, notebook: str | None = None,
                    status: str | Iterable[str] | None = None) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if model_id is not None:
        filters.append(requests.model_id == model_id)
    if notebook is not None:
        filters.append(requests.notebook == notebook)
    if isinstance(status, str):
        filters.append(requests.status == status)
    elif status is not None:
        filters.append(requests.status.in_(list(status)))
    return filters


def history_page(filters: list[ColumnElement[bool]], *, limit: int, offset: int = 0,
                 preview_chars: int = 200) -> Select[Any]:
    """Newest first. With a model filter: ix_requests_model_created; notebook:
    ix_requests_notebook_created; status: ix_requests_status_created; none: ix_requests_created."""
    # A chat request has messages instead of a prompt: its preview is the messages' JSON.
    prompt = func.coalesce(requests.prompt, cast(requests.messages, Text))
    previews = (func.substr(prompt, 1, preview_chars).label("prompt_preview"),
                func.substr(requests.output_text, 1, preview_chars).label("output_preview"))
    return (select(*LIST_COLUMNS, *previews)
            .where(*filters)
            .order_by(requests.created_at.desc())
            .limit(limit).offset(offset))


def history_count(filters: list[ColumnElement[bool]]) -> Select[Any]:
    return select(func.count()).select_from(requests_table).where(*filters)
