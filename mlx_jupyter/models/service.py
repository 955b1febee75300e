"""What the REST routes do with models: list, register, forget, load, unload, pin.

Joins the registry (what exists; file work on the thread pool), the manager (what is loaded)
and the store (what is remembered: registrations, pins, use counts, last errors).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from ..contracts.models import Footprint, ForgottenModel, ModelDescription, ModelState
from ..services import BlockingPool, StoreService
from ..store.records import ModelStatus
from .manager import ModelManager
from .registry import FORGOTTEN, REGISTERED, ModelEntry, ModelInfo, ModelRegistry

if TYPE_CHECKING:
    from ..store import Store

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def _after_restore(method: Callable[Concatenate[ModelService, P], Awaitable[T]],
                   ) -> Callable[Concatenate[ModelService, P], Awaitable[T]]:
    """Waits until the store is ready first: by then `restore` has registered the remembered
    models again, so a request that arrives right after the start finds them."""
    @functools.wraps(method)
    async def after_restore(self: ModelService, *args: P.args, **kwargs: P.kwargs) -> T:
        await self.store.ready()
        return await method(self, *args, **kwargs)

    return after_restore


class ModelService:
    def __init__(self, registry: ModelRegistry, manager: ModelManager, store: StoreService,
                 pool: BlockingPool):
        self.registry = registry
        self.manager = manager
        self.store = store
        self._run = pool.run

    @_after_restore
    async def list(self) -> list[ModelDescription]:
        """Every model: where it is from, its size and estimate, whether and how it is loaded,
        how often it was used."""
        await self._run(self.registry.refresh)
        infos = await self._run(self.registry.infos)
        remembered = {row["name"]: row for row in await self.store.list_models()}
        return [self._describe(info, remembered.get(info.entry.name)) for info in infos]

    @_after_restore
    async def get(self, name: str) -> ModelDescription:
        info = await self._run(self.registry.info, name)
        return self._describe(info, await self.store.get_model(name))

    @_after_restore
    async def register(self, name: str, path: str) -> ModelDescription:
        entry = await self._run(self.registry.register, name, path)
        await self._remember(entry)
        return await self.get(name)

    @_after_restore
    async def forget(self, name: str, *, delete_files: bool = False) -> ForgottenModel:
        """Unloads (refused while requests are in flight) and forgets a model, for good: its
        row stays in the database with its history, marked forgotten, so the next start does
        not register it again."""
        entry = self.registry.get(name)
        await self.manager.unload(name, reason="forgotten")
        await self._run(self.registry.forget, name, delete_files=delete_files)
        self.manager.forget(name)
        await self.store.update_model(name, source=FORGOTTEN, pinned=False)
        return ForgottenModel(name=name, source=entry.source, deleted_files=delete_files)

    @_after_restore
    async def load(self, name: str) -> ModelDescription:
        await self.manager.load(name)
        return await self.get(name)

    @_after_restore
    async def unload(self, name: str) -> ModelDescription:
        await self.manager.unload(name)
        return await self.get(name)

    @_after_restore
    async def pin(self, name: str, pinned: bool) -> ModelDescription:
        self.manager.pin(name, pinned)
        await self.store.update_model(name, pinned=pinned)
        return await self.get(name)

    async def restore(self, store: Store) -> None:
        """At start-up, before requests that need the store are let through (`StoreService.open`
        calls it with the store): registrations and pins remembered from earlier runs. A folder
        that is gone or no longer valid is skipped with a warning, not fatal."""
        pinned = await self._run(self._restore_registrations, store)
        for name in pinned:
            self.manager.pin(name)

    def _restore_registrations(self, store: Store) -> list[str]:
        """On the pool (folders are checked, the store is read): registers the remembered
        folders again, records every listed model, returns the names to pin."""
        self.registry.refresh()
        pinned = []
        for row in store.list_models():
            if row["source"] == REGISTERED and row["name"] not in self.registry.names():
                try:
                    self.registry.register(row["name"], row["path"])
                except Exception as exc:
                    log.warning("registered model %s at %s is not usable any more: %s",
                                row["name"], row["path"], exc)
                    continue
            if row["pinned"] and row["name"] in self.registry.names():
                pinned.append(row["name"])
        for entry in self.registry.entries():
            store.ensure_model(entry.name, str(entry.path), entry.source, entry.kind)
        return pinned

    async def _remember(self, entry: ModelEntry) -> None:
        await self.store.ensure_model(entry.name, str(entry.path), entry.source, entry.kind)

    def _describe(self, info: ModelInfo, row: dict[str, Any] | None) -> ModelDescription:
        name = info.entry.name
        slot = self.manager.slots().get(name)
        state = (self.manager.describe(slot) if slot is not None
                 else ModelState(name=name, status=ModelStatus.UNLOADED.value, pid=None,
                                 budget_bytes=None, footprint=None, rss_bytes=None, live=None,
                                 pinned=False, active_requests=0, last_used_at=None,
                                 error=None))
        if state.status not in (ModelStatus.LOADED, ModelStatus.LOADING):
            # Not counted now: what a load would count, from the folder as it is.
            footprint = self.manager.footprint(info.estimate) if info.estimate else None
            state = state.model_copy(update={
                "footprint": Footprint(**footprint.to_dict()) if footprint else None,
                "budget_bytes": footprint.total_bytes if footprint else None})
        row = row or {}
        return ModelDescription(
            **info.to_dict(), **state.model_dump(exclude={"name", "last_used_at", "error"}),
            use_count=row.get("use_count", 0), registered_at=row.get("created_at"),
            last_used_at=state.last_used_at or row.get("last_used_at"),
            error=state.error or row.get("last_error"))
