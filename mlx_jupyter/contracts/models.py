"""What the model routes answer: a model as listed (`ModelDescription`), a loaded model's state
(`ModelState`, in mlx/api/status too), what a model is counted for (`Footprint`) and what its
worker holds now (`LiveMemory`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .base import Answer

# Where a model comes from, and what it is.
ModelSource = Literal["bundled", "registered", "folder", "huggingface"]
ModelKind = Literal["text", "vision", "audio", "embedding"]
# A model's state in the manager (the store's ModelStatus, checked equal by the tests).
ModelStatusName = Literal["unloaded", "loading", "loaded", "unloading", "failed"]


class Footprint(Answer):
    """What a loaded model is counted for against the memory budget, part by part."""

    model_bytes: int = Field(description="weights × the kind's overhead")
    prompt_cache_bytes: int = Field(description="the most its worker's prompt cache holds")
    kv_reserve_bytes: int = Field(
        description="max_batch_size × kv_reserve_tokens × KV bytes per token")
    worker_bytes: int = Field(description="the worker process beyond its model")
    total_bytes: int


class LiveMemory(Answer):
    """What a loaded model's worker holds now, by its latest report."""

    rss_bytes: int
    mlx_active_bytes: int
    mlx_cache_bytes: int
    mlx_peak_bytes: int
    prompt_cache_bytes: int = Field(description="the bytes the prompt cache's entries hold")
    prompt_cache_entries: int
    live_bytes: int = Field(description="what is compared with the estimate")


class ModelState(Answer):
    """A model's state in the manager, with its memory: the estimate it is counted for beside
    what its worker really holds."""

    name: str
    status: ModelStatusName
    pid: int | None = Field(description="the worker's process id while it runs")
    budget_bytes: int | None = Field(
        description="what it is (or, not loaded, would be) counted for; null without an "
                    "estimate")
    footprint: Footprint | None
    rss_bytes: int | None = Field(description="the worker's resident memory; null when not "
                                              "loaded")
    live: LiveMemory | None = Field(description="the worker's latest report; null when not "
                                                "loaded")
    pinned: bool
    active_requests: int
    last_used_at: datetime | None
    error: str | None


class ModelDescription(ModelState):
    """A model as `GET mlx/api/models` lists it: where it is, its size and estimate, its state
    and how often it was used."""

    path: str
    source: ModelSource
    kind: ModelKind
    deletable: bool = Field(description="its files may be deleted (a Hugging Face download)")
    repo_id: str | None = Field(description="the Hugging Face repo of a cache model")
    available: bool = Field(description="its folder is there and loadable")
    problem: str | None = Field(description="why it is not available")
    size_bytes: int | None
    weight_bytes: int | None
    estimate_bytes: int | None = Field(description="weights × the kind's overhead")
    overhead: float | None
    kv_bytes_per_token: int | None
    use_count: int
    registered_at: datetime | None


class ModelList(Answer):
    models: list[ModelDescription]


class ForgottenModel(Answer):
    name: str
    source: ModelSource
    deleted_files: bool
