"""Which models exist and where their files are.

For now: the bundled demo model. Configured folders, the Hugging Face cache and registration
over REST plug in here later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFound

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"
DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "demo"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # "bundled", later also "folder", "huggingface", "registered"


class ModelRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    @classmethod
    def with_bundled(cls) -> ModelRegistry:
        registry = cls()
        registry.add(ModelEntry(DEMO_MODEL_NAME, DEMO_MODEL_PATH, "bundled"))
        return registry

    def add(self, entry: ModelEntry) -> None:
        self._entries[entry.name] = entry
        log.debug("registered model %s at %s (%s)", entry.name, entry.path, entry.source)

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ModelNotFound(name, list(self._entries)) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[ModelEntry]:
        return [self._entries[name] for name in self.names()]
