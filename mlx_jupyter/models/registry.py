"""Which models exist and where their files are.

Four sources, in order of precedence for a name:
- bundled: the demo model, named "demo";
- registered: folders registered by name (`register`, i.e. `POST mlx/api/models`), or seeded
  from the database at start (`add`);
- folder: each immediate subfolder of a configured model folder (`model_dirs`) that looks like
  an MLX model, named after the subfolder;
- huggingface: MLX-format repos in the Hugging Face cache, named by repo id.

A scanned model whose name is already taken is listed as "<name>-2", "-3", … (in the order
model_dirs are configured, then the cache), with a warning in the log.

Runs in the server on the thread pool: scans and validation read the disk outside the lock, so
`get()` from the event loop only ever waits for a dictionary swap. No mlx import here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest, MlxJupyterError, ModelNotFound
from ..limits import DEMO_MODEL_NAME, MAX_MODEL_NAME_CHARS
from .memory import (RACY_WINDOW_NS, InvalidModelFiles, MemoryEstimate, MemoryEstimator,
                     kind_of_config, read_config)
from .paths import (InvalidModelPath, ModelFolder, check_links_inside, check_request_path,
                    looks_like_model, resolve_under_roots, resolved_roots, validate_model_folder)

log = logging.getLogger(__name__)

DEMO_MODEL_PATH = Path(__file__).resolve().parent.parent / "demo"

BUNDLED, REGISTERED, FOLDER, HUGGINGFACE = "bundled", "registered", "folder", "huggingface"
# The stored source of a model that was forgotten: its row (and history) stays, but nothing
# registers it again at start-up.
FORGOTTEN = "forgotten"

# Segments separated by "/" (for repo ids such as mlx-community/Foo), each starting with a
# letter or digit and holding no "..": no empty, "." or ".." segment can sneak into a URL or a
# path. Written without lookarounds, so JSON Schema (the OpenAPI document) states it as is.
_SEGMENT = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?"
NAME_PATTERN = rf"^{_SEGMENT}(?:/{_SEGMENT})*$"
_NAME = re.compile(NAME_PATTERN)


class InvalidModelName(InvalidRequest):
    pass


class ModelExists(MlxJupyterError):
    status = 409


class ModelNotForgettable(MlxJupyterError):
    """The model cannot be forgotten as asked: where it comes from (bundled, a configured
    folder, the Hugging Face cache without deleting its files) decides, not the request."""

    status = 409


class ModelFilesMissing(MlxJupyterError):
    """A known model whose folder is gone."""

    status = 404


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # BUNDLED, REGISTERED, FOLDER or HUGGINGFACE
    kind: str = "text"
    deletable: bool = False  # its files may be deleted through the API (cache downloads)
    repo_id: str | None = None  # the Hugging Face repo of a cache model


@dataclass(frozen=True)
class RefreshResult:
    added: list[ModelEntry]
    removed: list[ModelEntry]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class ModelInfo:
    """An entry with what its folder says now, for listings."""

    entry: ModelEntry
    available: bool
    problem: str | None = None  # why it is not available
    estimate: MemoryEstimate | None = None

    def to_dict(self) -> dict[str, Any]:
        estimate = self.estimate
        return {"name": self.entry.name, "path": str(self.entry.path),
                "source": self.entry.source, "kind": self.entry.kind,
                "deletable": self.entry.deletable, "repo_id": self.entry.repo_id,
                "available": self.available, "problem": self.problem,
                "size_bytes": estimate.size_on_disk if estimate else None,
                "weight_bytes": estimate.weight_bytes if estimate else None,
                "estimate_bytes": estimate.estimate_bytes if estimate else None,
                "overhead": estimate.overhead if estimate else None,
                "kv_bytes_per_token": estimate.kv_bytes_per_token if estimate else None}


@dataclass(frozen=True)
class _Resolution:
    entry: ModelEntry
    stat_key: tuple[int, int, int]
    path: Path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidModelName("a model name must be a non-empty string")
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise InvalidModelName(f"model name is longer than {MAX_MODEL_NAME_CHARS} characters")
    if not _NAME.match(name):
        raise InvalidModelName(f"model name {name!r} is not allowed: use letters, digits, "
                               f"'.', '_', '-' and '/' between parts, each part starting with "
                               f"a letter or digit, and no '..'")
    return name


def is_valid_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidModelName:
        return False
    return True


def name_from_folder(folder_name: str) -> str | None:
    """A model name for a folder name: unusual characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", folder_name).lstrip("._-")[:MAX_MODEL_NAME_CHARS]
    name = re.sub(r"\.{2,}", ".", name)
    return name or None


def _recent(mtime_ns: int) -> bool:
    return time.time_ns() - mtime_ns <= RACY_WINDOW_NS


class ModelRegistry:
    def __init__(self, *, model_dirs: Iterable[str | os.PathLike[str]] = (),
                 allowed_roots: Iterable[str | os.PathLike[str]] = (),
                 hf_cache: bool = True, hf_cache_dir: str | os.PathLike[str] | None = None,
                 estimator: MemoryEstimator | None = None) -> None:
        self.model_dirs = tuple(Path(os.path.expanduser(os.fspath(d))) for d in model_dirs)
        self.allowed_roots = resolved_roots(allowed_roots)
        self.hf_cache = hf_cache
        self._hf_cache_dir = Path(hf_cache_dir) if hf_cache_dir is not None else None
        self.estimator = estimator or MemoryEstimator()
        self._lock = threading.RLock()  # guards the dictionaries below
        self._refresh_lock = threading.Lock()  # one scan at a time
        self._explicit: dict[str, ModelEntry] = {}  # bundled and registered
        self._scanned: list[ModelEntry] = []  # model_dirs, then the cache, before renaming
        self._entries: dict[str, ModelEntry] = {}
        self._resolved: dict[str, _Resolution] = {}
        self.resolve_hits = self.resolve_misses = 0
        # Scan caches, touched only under _refresh_lock.
        self._folder_verdicts: dict[str, tuple[tuple, ModelEntry | None]] = {}
        self._hf_state: tuple[tuple, list[ModelEntry]] | None = None

    @classmethod
    def with_bundled(cls, **options: Any) -> ModelRegistry:
        registry = cls(**options)
        registry.add(ModelEntry(DEMO_MODEL_NAME, DEMO_MODEL_PATH, BUNDLED))
        return registry

    @property
    def hf_cache_dir(self) -> Path:
        if self._hf_cache_dir is not None:
            return self._hf_cache_dir
        from huggingface_hub import constants  # imported only when the cache is used

        return Path(constants.HF_HUB_CACHE)

    # -- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> ModelEntry:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise ModelNotFound(name, list(self._entries))
            return entry

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return [self._entries[name] for name in sorted(self._entries)]

    def resolve(self, name: str) -> Path:
        """The resolved folder of a model, checked to be loadable (and, for registered models,
        to be under the allowed roots, when any are configured). Cached until the folder
        changes (inode or mtime)."""
        entry = self.get(name)
        key = self._stat_key(entry)
        with self._lock:
            cached = self._resolved.get(name)
            if cached is not None and cached.entry == entry and cached.stat_key == key:
                self.resolve_hits += 1
                return cached.path
            self.resolve_misses += 1
        path = self._validate(entry).path
        if not _recent(key[2]):  # a folder being written may change within one mtime tick
            with self._lock:
                self._resolved[name] = _Resolution(entry, key, path)
        return path

    def estimate(self, name: str) -> MemoryEstimate:
        return self.estimator.estimate(self.resolve(name))

    def info(self, name: str) -> ModelInfo:
        entry = self.get(name)
        try:
            return ModelInfo(entry, available=True, estimate=self.estimate(name))
        except MlxJupyterError as error:
            return ModelInfo(entry, available=False, problem=str(error))
        except OSError as error:  # e.g. removed while it was being read
            return ModelInfo(entry, available=False, problem=f"{entry.path}: {error}")

    def infos(self) -> list[ModelInfo]:
        """Every model with its size and estimate (cached), for `GET mlx/api/models`."""
        return [self.info(entry.name) for entry in self.entries()]

    def clear_caches(self) -> None:
        """Forgets cached resolutions, estimates and scans (the next calls read the disk)."""
        with self._lock:
            self._resolved.clear()
        with self._refresh_lock:
            self._folder_verdicts.clear()
            self._hf_state = None
        self.estimator.invalidate()

    # -- registering and forgetting ---------------------------------------------------------

    def add(self, entry: ModelEntry) -> None:
        """Adds a trusted entry without validating its folder (the bundled model, or one the
        database remembers: `resolve` still checks it before it is loaded)."""
        check_name(entry.name)
        with self._lock:
            if self._explicit.get(entry.name) == entry:
                return
            self._refuse_taken(entry.name)
            self._explicit[entry.name] = entry
            self._rebuild()
        log.debug("added model %s at %s (%s)", entry.name, entry.path, entry.source)

    def register(self, name: str, path: str | os.PathLike[str], *,
                 validate: bool = True) -> ModelEntry:
        """Registers a local folder under a name, after checking it is safe and loadable."""
        check_name(name)
        given = Path(check_request_path(path))  # kept as given: links are followed on use
        with self._lock:
            self._refuse_taken(name)
        if validate:
            folder = resolve_under_roots(given, self.allowed_roots)
            check_links_inside(folder, self.allowed_roots)
            kind = validate_model_folder(folder).kind
        else:
            kind = _kind_or_text(given)
        entry = ModelEntry(name, given, REGISTERED, kind=kind)
        with self._lock:
            self._refuse_taken(name)  # again: another thread may have taken it meanwhile
            self._explicit[name] = entry
            self._rebuild()
        log.info("registered model %s at %s", name, entry.path)
        return entry

    def forget(self, name: str, *, delete_files: bool = False) -> ModelEntry:
        """Forgets a registered model, or deletes a downloaded one from the Hugging Face cache.
        The caller unloads the model first."""
        entry = self.get(name)
        if delete_files and not entry.deletable:
            raise ModelNotForgettable(f"the files of {name!r} ({entry.source}) cannot be "
                                      f"deleted: only models downloaded to the Hugging Face "
                                      f"cache can")
        if entry.source == BUNDLED:
            raise ModelNotForgettable(f"{name!r} is the bundled demo model; it cannot be "
                                      f"forgotten")
        if entry.source == FOLDER:
            raise ModelNotForgettable(f"{name!r} is found in a configured model folder "
                                      f"({entry.path.parent}); remove it there or change "
                                      f"c.MlxApp.model_dirs")
        if entry.source == HUGGINGFACE and not delete_files:
            raise ModelNotForgettable(f"{name!r} is in the Hugging Face cache and would be "
                                      f"found again; delete its files to forget it")
        if entry.source == HUGGINGFACE:
            with self._refresh_lock:  # so no scan running meanwhile lists it again
                self._delete_from_hf_cache(entry)
                self._drop(entry)
        else:
            self._drop(entry)
        self.estimator.invalidate(entry.path)
        log.info("forgot model %s (%s)%s", name, entry.source,
                 "; deleted its files" if delete_files else "")
        return entry

    def _drop(self, entry: ModelEntry) -> None:
        with self._lock:
            if self._explicit.get(entry.name) == entry:
                del self._explicit[entry.name]
            else:  # a scanned entry, listed under its own or a suffixed name
                self._scanned = [e for e in self._scanned if e.path != entry.path]
            self._rebuild()

    def _refuse_taken(self, name: str) -> None:
        if name in self._entries:
            taken = self._entries[name]
            raise ModelExists(f"a model named {name!r} already exists ({taken.source}, "
                              f"{taken.path})")

    # -- scanning ---------------------------------------------------------------------------

    def refresh(self) -> RefreshResult:
        """Rescans the model folders and the Hugging Face cache; cheap when nothing changed
        (one listing per model folder and a few stats per subfolder and cached repo)."""
        with self._refresh_lock:
            scanned = self._scan_model_dirs() + self._scan_hf_cache()
            with self._lock:
                before = dict(self._entries)
                self._scanned = scanned
                self._rebuild()
                after = dict(self._entries)
        added = [e for name, e in after.items() if before.get(name) != e]
        removed = [e for name, e in before.items() if after.get(name) != e]
        if added or removed:
            log.info("model scan: %d added, %d removed", len(added), len(removed))
        return RefreshResult(added=added, removed=removed)

    def _rebuild(self) -> None:
        """Merges the sources into the name → entry map (caller holds the lock)."""
        entries = dict(self._explicit)
        for entry in self._scanned:
            name, n = entry.name, 1
            while name in entries:
                n += 1
                name = f"{entry.name}-{n}"
            if name != entry.name:
                log.warning("model name %r is taken; listing %s as %r", entry.name,
                            entry.path, name)
                entry = replace(entry, name=name)
            entries[name] = entry
        self._entries = entries
        self._resolved = {name: r for name, r in self._resolved.items()
                          if entries.get(name) == r.entry}

    def _scan_model_dirs(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        seen: set[str] = set()
        for model_dir in self.model_dirs:
            try:
                subfolders = sorted((e for e in os.scandir(model_dir)
                                     if not e.name.startswith(".") and e.is_dir()),
                                    key=lambda e: e.name)
            except OSError as error:
                log.warning("model folder %s cannot be listed: %s", model_dir,
                            error.strerror or error)
                continue
            for subfolder in subfolders:
                seen.add(subfolder.path)
                entry = self._folder_verdict(Path(subfolder.path))
                if entry is not None:
                    found.append(entry)
        self._folder_verdicts = {p: v for p, v in self._folder_verdicts.items() if p in seen}
        return found

    def _folder_verdict(self, folder: Path) -> ModelEntry | None:
        """The entry for a model_dirs subfolder, or None; re-read only when its stat changes."""
        try:
            st = os.stat(folder)
        except OSError:
            return None
        key = (st.st_dev, st.st_ino, st.st_mtime_ns)
        cached = self._folder_verdicts.get(str(folder))
        if cached is not None and cached[0] == key:
            return cached[1]
        entry = _folder_entry(folder)
        if not _recent(st.st_mtime_ns):
            self._folder_verdicts[str(folder)] = (key, entry)
        return entry

    def _scan_hf_cache(self) -> list[ModelEntry]:
        if not self.hf_cache:
            return []
        cache_dir = self.hf_cache_dir
        fingerprint = _hf_fingerprint(cache_dir)
        if self._hf_state is not None and self._hf_state[0] == fingerprint:
            return self._hf_state[1]
        entries = _hf_cache_entries(cache_dir)
        if not any(_recent(mtime) for _, mtimes in fingerprint for mtime in mtimes):
            self._hf_state = (fingerprint, entries)
        return entries

    def _delete_from_hf_cache(self, entry: ModelEntry) -> None:
        """Deletes every cached revision of the entry's repo (caller holds _refresh_lock)."""
        from huggingface_hub import scan_cache_dir

        cache_dir = self.hf_cache_dir
        cache = scan_cache_dir(cache_dir)
        repos = [repo for repo in cache.repos
                 if repo.repo_type == "model" and repo.repo_id == entry.repo_id]
        if not repos:
            raise ModelFilesMissing(f"{entry.repo_id!r} is no longer in the Hugging Face cache "
                                    f"at {cache_dir}")
        hashes = [revision.commit_hash for repo in repos for revision in repo.revisions]
        strategy = cache.delete_revisions(*hashes)
        log.info("deleting %s from the Hugging Face cache (%s)", entry.repo_id,
                 strategy.expected_freed_size_str)
        strategy.execute()
        self._hf_state = None

    # -- validation -------------------------------------------------------------------------

    def _stat_key(self, entry: ModelEntry) -> tuple[int, int, int]:
        try:
            st = os.stat(entry.path)
        except FileNotFoundError:
            raise ModelFilesMissing(f"the folder of model {entry.name!r} is gone: "
                                    f"{entry.path}") from None
        except OSError as error:
            raise InvalidModelPath(f"the folder of model {entry.name!r} cannot be read: "
                                   f"{error.strerror or error}") from None
        return (st.st_dev, st.st_ino, st.st_mtime_ns)

    def _validate(self, entry: ModelEntry) -> ModelFolder:
        if entry.source == REGISTERED and self.allowed_roots:
            # A request chose it: the roots apply now as then (a link may have been swapped).
            # Without roots, registering is off, and what the database remembers is trusted.
            folder = resolve_under_roots(entry.path, self.allowed_roots)
            check_links_inside(folder, self.allowed_roots)
        else:  # configured or bundled: trusted where it is
            folder = Path(os.path.realpath(entry.path))
        return validate_model_folder(folder)


# -- helpers for the scans --------------------------------------------------------------------


def _kind_or_text(folder: Path) -> str:
    try:
        return kind_of_config(read_config(folder))
    except InvalidModelFiles:
        return "text"


def _folder_entry(folder: Path) -> ModelEntry | None:
    try:
        names = [entry.name for entry in os.scandir(folder)]
    except OSError:
        return None
    name = name_from_folder(folder.name)
    if name is None or not looks_like_model(names):
        return None
    try:
        kind = kind_of_config(read_config(folder))
    except InvalidModelFiles as error:
        log.info("skipping %s: %s", folder, error)
        return None
    return ModelEntry(name, folder, FOLDER, kind=kind)


def _hf_fingerprint(cache_dir: Path) -> tuple:
    """Stats that move when a repo, snapshot or ref is added, removed or written to:
    ((repo folder name, (mtime_ns of repo, snapshots/, each snapshot, refs/, refs/main)), …)."""
    try:
        repos = sorted(e.name for e in os.scandir(cache_dir) if e.name.startswith("models--"))
    except OSError:
        return ()
    fingerprint = []
    for repo in repos:
        repo_dir = cache_dir / repo
        paths = [repo_dir, repo_dir / "snapshots", repo_dir / "refs", repo_dir / "refs" / "main"]
        try:
            paths += [Path(e.path) for e in os.scandir(repo_dir / "snapshots")]
        except OSError:
            pass
        fingerprint.append((repo, tuple(_mtime_ns(path) for path in sorted(paths))))
    return tuple(fingerprint)


def _mtime_ns(path: Path) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _hf_cache_entries(cache_dir: Path) -> list[ModelEntry]:
    """MLX-format model repos in the Hugging Face cache (latest snapshot loadable by name)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return []
    for warning in cache.warnings:
        log.debug("Hugging Face cache: %s", warning)
    entries = []
    for repo in sorted(cache.repos, key=lambda repo: repo.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        revision = _latest_revision(repo.revisions)
        snapshot = revision.snapshot_path
        names = [f.file_name for f in revision.files if f.file_path.parent == snapshot]
        if not looks_like_model(names):
            continue
        name = repo.repo_id if is_valid_name(repo.repo_id) else name_from_folder(repo.repo_id)
        if not name:
            continue
        entries.append(ModelEntry(name, snapshot, HUGGINGFACE, kind=_kind_or_text(snapshot),
                                  deletable=True, repo_id=repo.repo_id))
    return entries


def _latest_revision(revisions: Iterable[Any]) -> Any:
    """The snapshot "main" points to, else the most recently modified one."""
    revisions = list(revisions)
    main = [revision for revision in revisions if "main" in revision.refs]
    return (main or sorted(revisions, key=lambda revision: revision.last_modified))[-1]


def entry_record(entry: ModelEntry,
                 estimate: MemoryEstimate | None = None) -> Mapping[str, Any]:
    """An entry as the database's models row (name, path, source, kind, size, estimate)."""
    record = asdict(entry)
    record["path"] = str(entry.path)
    record["size"] = estimate.size_on_disk if estimate else None
    record["estimate"] = estimate.estimate_bytes if estimate else None
    return record
