"""How much memory a model needs, how much the machine has, and how much models may use.

Runs in the server process (on the thread pool), so it never imports mlx: weight sizes come
straight from the safetensors headers (8-byte little-endian length, then a JSON header with
each tensor's dtype, shape and data offsets), the model's kind from its config.json.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from ..errors import InvalidRequest

log = logging.getLogger(__name__)

# Memory a loaded model takes beyond its weights (activations, runtime buffers), by kind; its
# KV cache and prompt cache are counted apart (`Footprint`).
KIND_OVERHEADS: dict[str, float] = {"text": 1.25, "vision": 1.25, "audio": 1.15}
DEFAULT_KIND = "text"
DEFAULT_BUDGET_FRACTION = 0.8

# model_type values of speech/audio models; mlx-community's whisper exports have no model_type
# but carry whisper's dimension keys instead.
AUDIO_MODEL_TYPES = frozenset({
    "whisper", "wav2vec2", "hubert", "wavlm", "encodec", "speecht5", "seamless_m4t", "bark",
    "musicgen", "parakeet", "kokoro", "csm", "sesame", "qwen2_audio", "voxtral", "moshi"})
AUDIO_CONFIG_KEYS = frozenset({"n_mels", "n_audio_ctx", "n_audio_state"})

# Bits per element of every safetensors dtype (F4 and F6 pack several elements per byte).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
CONFIG_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors format itself sets
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# A folder written this recently may still change within the file system's timestamp
# granularity without its mtime moving: its results are not cached (git's "racy clean" rule).
RACY_WINDOW_NS = 2_000_000_000


class InvalidModelFiles(InvalidRequest):
    """A model folder's config or weight files are missing, unreadable or corrupt."""


class InvalidMemoryBudget(InvalidRequest, ValueError):
    """A memory budget setting that cannot be understood."""


# -- safetensors ----------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, dict]:
    """The tensors a safetensors file declares, checked against the file's size."""
    try:
        with open(path, "rb") as file:
            file_size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise InvalidModelFiles(f"{path.name} is not a safetensors file: "
                                        f"only {len(prefix)} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                raise InvalidModelFiles(f"{path.name} has a corrupt safetensors header: it "
                                        f"claims {header_len} header bytes in a "
                                        f"{file_size}-byte file")
            raw = file.read(header_len)
    except OSError as error:
        raise InvalidModelFiles(f"cannot read {path.name}: {error.strerror or error}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidModelFiles(f"{path.name} has a corrupt safetensors header: "
                                f"not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidModelFiles(f"{path.name} has a corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_size = file_size - 8 - header_len
    for name, info in header.items():
        _check_tensor(path.name, name, info, data_size)
    return header


def _check_tensor(file_name: str, name: str, info: object, data_size: int) -> None:
    def corrupt(why: str) -> InvalidModelFiles:
        return InvalidModelFiles(f"{file_name} has a corrupt safetensors header: "
                                 f"tensor {name!r} {why}")

    if not isinstance(info, dict):
        raise corrupt("is not described by an object")
    offsets, shape = info.get("data_offsets"), info.get("shape")
    if info.get("dtype") not in DTYPE_BITS:
        raise corrupt(f"has an unknown dtype {info.get('dtype')!r}")
    if not (isinstance(shape, list) and all(_is_count(n) for n in shape)):
        raise corrupt("has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1] <= data_size):
        raise corrupt("has data offsets outside the file")
    if offsets[1] - offsets[0] != tensor_bytes(info):
        raise corrupt("has data offsets that do not match its dtype and shape")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def tensor_bytes(info: Mapping) -> int:
    """Bytes of one tensor from its safetensors dtype and shape."""
    return math.ceil(math.prod(info["shape"]) * DTYPE_BITS[info["dtype"]] / 8)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding a model's weights, sorted.

    mlx-lm loads `model*.safetensors`; folders of other tools (e.g. whisper's
    `weights.safetensors`) fall back to every `*.safetensors`. When a shard index exists,
    every shard it lists must be there: a half-downloaded model is refused, not underestimated.
    """
    names = sorted(entry.name for entry in os.scandir(folder)
                   if entry.name.endswith(".safetensors") and entry.is_file())
    preferred = [name for name in names if name.startswith("model")]
    files = [folder / name for name in (preferred or names)]
    missing = sorted(set(_indexed_shards(folder)) - {path.name for path in files})
    if missing:
        raise InvalidModelFiles(f"{INDEX_FILE} lists {len(missing)} weight file(s) that are "
                                f"missing, e.g. {missing[0]}")
    return files


def _indexed_shards(folder: Path) -> Iterable[str]:
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        return ()
    try:
        weight_map = json.loads(index_path.read_bytes())["weight_map"]
        return set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InvalidModelFiles(f"{INDEX_FILE} is corrupt: no readable weight_map") from None


def weight_bytes(folder: str | os.PathLike[str]) -> int:
    """Total bytes of a model's weights, read from its safetensors headers (not file sizes)."""
    return _weights(Path(folder)).bytes


@dataclass(frozen=True)
class _Weights:
    bytes: int
    files: int
    float_bytes: dict[str, int]  # bytes held by each floating-point dtype


def _weights(folder: Path) -> _Weights:
    files = weight_files(folder)
    if not files:
        raise InvalidModelFiles(f"no .safetensors weight files in {folder}")
    total, by_dtype = 0, collections.Counter()
    for path in files:
        for info in safetensors_header(path).values():
            size = tensor_bytes(info)
            total += size
            if info["dtype"] in FLOAT_DTYPES:
                by_dtype[info["dtype"]] += size
    return _Weights(total, len(files), dict(by_dtype))


def activation_element_bytes(float_bytes: Mapping[str, int], config: Mapping) -> int:
    """Bytes of one element of the model's activations, and so of its KV cache: the float
    dtype holding most of its weights (a quantized model's scales are in the dtype it computes
    in), else the config's torch_dtype, else 2 (half precision)."""
    if float_bytes:
        return DTYPE_BITS[max(float_bytes, key=float_bytes.__getitem__)] // 8
    return CONFIG_DTYPE_BYTES.get(str(config.get("torch_dtype") or config.get("dtype")), 2)


def kv_bytes_per_token(config: Mapping, element_bytes: int) -> int:
    """Bytes of KV cache one token takes in a model of this config: keys and values of every
    layer, num_key_value_heads × head_dim each. A vision model's text part is read from its
    text_config; fields a config lacks fall back to multi-head attention over hidden_size.
    0 when the config says nothing of its attention (the reservation then counts nothing)."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and "num_hidden_layers" not in config:
        config = {**config, **text}
    layers = _config_int(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _config_int(config, "num_attention_heads", "n_head", "num_heads")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    kv_heads = _config_int(config, "num_key_value_heads", "n_kv_heads") or heads
    head_dim = _config_int(config, "head_dim") or (hidden // heads if heads else 0)
    if not (layers and kv_heads and head_dim):
        return 0
    return 2 * layers * kv_heads * head_dim * element_bytes


def _config_int(config: Mapping, *keys: str) -> int:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


# -- kind and config ------------------------------------------------------------------------


def read_config(folder: Path) -> dict:
    """A model folder's config.json as a dict, or an error that says what is wrong with it."""
    path = folder / CONFIG_FILE
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidModelFiles(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidModelFiles(f"{CONFIG_FILE} is missing") from None
    except OSError as error:
        raise InvalidModelFiles(f"cannot read {CONFIG_FILE}: {error.strerror or error}") from None
    except ValueError as error:
        raise InvalidModelFiles(f"{CONFIG_FILE} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidModelFiles(f"{CONFIG_FILE} is not a JSON object")
    return config


def kind_of_config(config: Mapping) -> str:
    """"audio", "vision" or "text" (the default) from a model's config."""
    model_type = str(config.get("model_type", "")).lower()
    architectures = " ".join(map(str, config.get("architectures") or ())).lower()
    if (model_type in AUDIO_MODEL_TYPES or AUDIO_CONFIG_KEYS & config.keys()
            or any(word in architectures for word in ("whisper", "speech", "audio", "forctc"))):
        return "audio"
    if "vision_config" in config:
        return "vision"
    return DEFAULT_KIND


def model_kind(folder: str | os.PathLike[str]) -> str:
    return kind_of_config(read_config(Path(folder)))


# -- estimates, cached ----------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int  # from the safetensors headers
    kind: str
    overhead: float  # multiplier for the kind
    estimate_bytes: int  # weight_bytes × overhead
    files: int  # weight files
    size_on_disk: int  # every file in the folder, links followed
    kv_bytes_per_token: int = 0  # KV cache of one token (keys and values, every layer)


@dataclass(frozen=True)
class Footprint:
    """What a loaded model is counted for against the memory budget, part by part."""

    model_bytes: int  # weights × the kind's overhead
    prompt_cache_bytes: int  # the most its worker's prompt cache holds
    kv_reserve_bytes: int  # max_batch_size × kv_reserve_tokens × KV bytes per token
    worker_bytes: int  # the worker process beyond its model

    @property
    def total_bytes(self) -> int:
        return (self.model_bytes + self.prompt_cache_bytes + self.kv_reserve_bytes
                + self.worker_bytes)

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


@dataclass(frozen=True)
class _Cached:
    estimate: MemoryEstimate
    fingerprint: tuple
    expires: float  # time.monotonic()


class MemoryEstimator:
    """Memory estimates per model folder, cached for `ttl_seconds` and dropped at once when the
    folder's fingerprint changes (folder mtime, and size/mtime of config and weight files).

    Thread-safe; concurrent first requests for one folder compute it once.
    """

    def __init__(self, ttl_seconds: float = 300.0,
                 overheads: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_seconds = ttl_seconds
        self.overheads = dict(KIND_OVERHEADS if overheads is None else overheads)
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()  # guards _cache, _folder_locks and counters
        self._folder_locks: dict[str, threading.Lock] = {}
        self.hits = self.misses = self.invalidations = self.expirations = 0

    def overhead_for(self, kind: str) -> float:
        return self.overheads.get(kind, self.overheads.get(DEFAULT_KIND, 1.0))

    def estimate(self, folder: str | os.PathLike[str]) -> MemoryEstimate:
        key = os.path.realpath(folder)
        with self._folder_lock(key):
            cached = self._fresh(key)
            if cached is not None:
                return cached
            started = time.perf_counter()
            try:
                fingerprint = folder_fingerprint(Path(key))
                estimate = self._compute(Path(key))
            except OSError as error:
                raise InvalidModelFiles(f"cannot read {key}: {error.strerror or error}") from None
            if _settled(fingerprint):
                with self._lock:
                    self._cache[key] = _Cached(estimate, fingerprint,
                                               self._clock() + self.ttl_seconds)
            log.debug("estimated %s: %d weight bytes in %d file(s), %s × %.2f, in %.1f ms",
                      key, estimate.weight_bytes, estimate.files, estimate.kind,
                      estimate.overhead, (time.perf_counter() - started) * 1e3)
            return estimate

    def invalidate(self, folder: str | os.PathLike[str] | None = None) -> None:
        """Drops one folder's cached estimate, or all of them."""
        with self._lock:
            if folder is None:
                self._cache.clear()
            else:
                self._cache.pop(os.path.realpath(folder), None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses,
                    "invalidations": self.invalidations, "expirations": self.expirations,
                    "entries": len(self._cache)}

    def _folder_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._folder_locks.setdefault(key, threading.Lock())

    def _fresh(self, key: str) -> MemoryEstimate | None:
        """The cached estimate if it has neither expired nor gone stale; counts hit or miss."""
        with self._lock:
            cached = self._cache.get(key)
        reason = None
        if cached is None:
            reason = "miss"
        elif self._clock() >= cached.expires:
            reason = "expired"
        elif not fingerprint_matches(Path(key), cached.fingerprint):
            reason = "changed"
        with self._lock:
            if reason is None:
                self.hits += 1
                return cached.estimate
            self.misses += 1
            if reason == "expired":
                self.expirations += 1
            elif reason == "changed":
                self.invalidations += 1
            self._cache.pop(key, None)
        log.debug("memory estimate cache %s for %s", reason, key)
        return None

    def _compute(self, folder: Path) -> MemoryEstimate:
        config = read_config(folder)
        kind = kind_of_config(config)
        weights = _weights(folder)
        overhead = self.overhead_for(kind)
        return MemoryEstimate(
            weight_bytes=weights.bytes, kind=kind, overhead=overhead,
            estimate_bytes=int(weights.bytes * overhead), files=weights.files,
            size_on_disk=folder_size(folder),
            kv_bytes_per_token=kv_bytes_per_token(
                config, activation_element_bytes(weights.float_bytes, config)))


# -- fingerprints ---------------------------------------------------------------------------
# A fingerprint is (folder identity and mtime, ((name, size, mtime_ns, inode) of config.json
# and each weight file)). Adding, removing or renaming a file moves the folder's mtime;
# rewriting a file in place moves its own. Checking a fingerprint costs one stat per file it
# names and no directory listing.


def _is_fingerprinted(name: str) -> bool:
    return name.endswith(".safetensors") or name in (CONFIG_FILE, INDEX_FILE)


def folder_fingerprint(folder: Path) -> tuple:
    """The fingerprint of a folder (one listing, then one stat per file it covers)."""
    names = sorted(entry.name for entry in os.scandir(folder) if _is_fingerprinted(entry.name))
    return _fingerprint(folder, names)


def fingerprint_matches(folder: Path, fingerprint: tuple) -> bool:
    """Whether a folder still has a fingerprint, checked with stats only (no listing)."""
    try:
        return _fingerprint(folder, [item[0] for item in fingerprint[1]]) == fingerprint
    except OSError:
        return False


def _fingerprint(folder: Path, names: list[str]) -> tuple:
    # Stats relative to the open folder: the kernel walks the folder's path once, not per
    # file, which halves the cost for a model of many shards.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        folder_stat = os.fstat(fd)
        files = tuple(_file_key(name, fd) for name in names)
    finally:
        os.close(fd)
    return ((folder_stat.st_dev, folder_stat.st_ino, folder_stat.st_mtime_ns), files)


def _file_key(name: str, folder_fd: int) -> tuple[str, int, int, int]:
    try:
        st = os.stat(name, dir_fd=folder_fd)  # follows links: Hugging Face blobs count
    except FileNotFoundError:
        return (name, -1, 0, 0)
    return (name, st.st_size, st.st_mtime_ns, st.st_ino)


def _settled(fingerprint: tuple) -> bool:
    """False while the folder or one of its files was written within RACY_WINDOW_NS."""
    newest = max([fingerprint[0][2], *(item[2] for item in fingerprint[1])])
    return time.time_ns() - newest > RACY_WINDOW_NS


def folder_size(folder: Path) -> int:
    """Bytes of the files directly in a folder, symlinks followed (Hugging Face snapshots link
    to blobs)."""
    total = 0
    for entry in os.scandir(folder):
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except OSError:
            pass  # a dangling link or a file removed meanwhile
    return total


# -- system memory and budget ---------------------------------------------------------------


@dataclass(frozen=True)
class SystemMemory:
    total: int
    available: int


def system_memory() -> SystemMemory:
    """RAM of the machine, or of the container when a cgroup limit is lower."""
    memory = psutil.virtual_memory()
    total, available = memory.total, memory.available
    limit, used = _cgroup_memory()
    if limit is not None and limit < total:
        total = limit
        available = min(available, max(limit - (used or 0), 0))
    return SystemMemory(total=total, available=available)


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of the cgroup v2 this process runs in, when it has a limit."""
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        limit = None if raw == "max" else int(raw)
    except (OSError, ValueError):
        return None, None
    try:
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        used = None
    return limit, used


_UNITS = {"": 1, "b": 1,
          "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*|%)\s*$", re.IGNORECASE)


def budget_bytes(configured: int | float | str | None, total: int) -> int:
    """Bytes models may use, from a setting: None or "" (80% of `total`), a fraction in (0, 1],
    an int of bytes, or a string such as "12GB", "8GiB", "8G" (binary, like docker), "75%"."""
    if configured is None or (isinstance(configured, str) and not configured.strip()):
        return int(total * DEFAULT_BUDGET_FRACTION)
    if isinstance(configured, bool):
        raise InvalidMemoryBudget(f"memory budget {configured!r} is not a size")
    if isinstance(configured, int):
        return _positive(configured, configured)
    if isinstance(configured, float):
        return _fraction(configured, total, configured)
    if isinstance(configured, str):
        return _parse_size(configured, total)
    raise InvalidMemoryBudget(f"memory budget {configured!r} is not a size")


def _parse_size(text: str, total: int) -> int:
    match = _SIZE.match(text)
    if not match:
        raise InvalidMemoryBudget(f"memory budget {text!r} is not a size like '12GB', "
                                  f"'8GiB', '75%' or '0.8'")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        return _fraction(number / 100, total, text)
    if unit not in _UNITS:
        raise InvalidMemoryBudget(f"memory budget {text!r} has an unknown unit {unit!r}; "
                                  f"use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    if not unit and "." in match.group(1):
        return _fraction(number, total, text)  # "0.8": a fraction, as a float would be
    return _positive(int(number * _UNITS[unit]), text)


def _fraction(fraction: float, total: int, shown: object) -> int:
    if not 0 < fraction <= 1:
        raise InvalidMemoryBudget(f"memory budget {shown!r} is not a fraction in (0, 1] "
                                  f"(nor a percentage in (0%, 100%]); give bytes as an "
                                  f"integer or a string like '12GB'")
    return int(total * fraction)


def _positive(value: int, shown: object) -> int:
    if value <= 0:
        raise InvalidMemoryBudget(f"memory budget {shown!r} must be more than 0 bytes")
    return value


# -- processes ------------------------------------------------------------------------------


def process_rss(pid: int | None) -> int | None:
    """Resident memory of a process and its children, or None when it is gone (or hidden)."""
    if pid is None:
        return None
    try:
        process = psutil.Process(pid)
        total = process.memory_info().rss
        children = process.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for child in children:
        try:
            total += child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass  # exited meanwhile
    return total


class RssSampler:
    """`process_rss` per pid, reused for `ttl` seconds: finding a process's children scans
    all of /proc (about a millisecond on a quiet machine), too slow for every status poll."""

    def __init__(self, ttl: float = 2.0):
        self.ttl = ttl
        self._readings: dict[int, tuple[int | None, float]] = {}

    def __call__(self, pid: int | None) -> int | None:
        if pid is None:
            return None
        now = time.monotonic()
        reading = self._readings.get(pid)
        if reading is None or reading[1] <= now:
            if len(self._readings) > 64:  # pids of workers long gone
                self._readings = {p: r for p, r in self._readings.items() if r[1] > now}
            reading = (process_rss(pid), now + self.ttl)
            self._readings[pid] = reading
        return reading[0]

