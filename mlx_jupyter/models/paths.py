"""Where a model folder may be, and whether mlx-lm could load what is in it.

A path from a request is trusted only after it resolves (every symlink followed) to a folder
under an allowed root, and only if the links inside that folder stay under the roots too.
A folder is a model when it has what `mlx_lm.load` reads: config.json with a model_type,
`model*.safetensors` with sound headers, and tokenizer files. No mlx import here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidRequest
from .memory import (InvalidModelFiles, kind_of_config, read_config, safetensors_header,
                     weight_files)

# Any of these lets mlx-lm's tokenizer loader (transformers' AutoTokenizer) build a tokenizer.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer.model", "tiktoken.model",
                             "vocab.json"})
TOKENIZER_SUFFIXES = (".tiktoken",)


class InvalidModelPath(InvalidRequest):
    """A model path that is unsafe, outside the allowed roots, or not a loadable model."""


class ModelPathForbidden(InvalidModelPath):
    """A well-formed path the server's allowed roots keep out."""

    status = 403


class ModelPathMissing(InvalidModelPath):
    """A well-formed path, under the roots, where there is nothing."""

    status = 404


@dataclass(frozen=True)
class ModelFolder:
    path: Path  # resolved
    config: dict
    kind: str
    weight_files: tuple[Path, ...]


# -- where ----------------------------------------------------------------------------------


def resolved_roots(roots: Iterable[str | os.PathLike[str]]) -> tuple[str, ...]:
    """The allowed roots, expanded (config may say "~/models") and resolved."""
    return tuple(os.path.realpath(os.path.expanduser(os.fspath(root))) for root in roots)


def is_within(path: str, root: str) -> bool:
    """Whether a resolved path is `root` or inside it (a string test on resolved paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_request_path(raw: str | os.PathLike[str]) -> str:
    """Refuses the path tricks a request might try before anything touches the disk."""
    text = os.fspath(raw)
    if not text.strip():
        raise InvalidModelPath("the model path is empty")
    if "\x00" in text:
        raise InvalidModelPath("the model path contains a NUL byte")
    if text.startswith("~"):
        raise InvalidModelPath(f"{text!r} starts with '~', which is not expanded; "
                               f"give an absolute path")
    if not os.path.isabs(text):
        raise InvalidModelPath(f"{text!r} is relative; give an absolute path (a relative one "
                               f"would depend on the server's working directory)")
    if ".." in Path(text).parts:
        raise InvalidModelPath(f"{text!r} contains '..'; give the folder's path without it")
    return os.path.normpath(text)


def resolve_under_roots(raw: str | os.PathLike[str], roots: Sequence[str]) -> Path:
    """The resolved folder a request path names, if it lies under one of the (resolved) roots."""
    text = check_request_path(raw)
    if not roots:
        raise ModelPathForbidden("no folders are allowed for models: configure "
                                 "c.MlxApp.allowed_model_roots")
    real = os.path.realpath(text)
    if not any(is_within(real, root) for root in roots):
        via = "" if real == text else f" resolves to {real}, which"
        raise ModelPathForbidden(f"{text}{via} is outside the allowed model roots "
                                 f"({', '.join(roots)})")
    if not os.path.exists(real):
        raise ModelPathMissing(f"{text} does not exist")
    if not os.path.isdir(real):
        raise InvalidModelPath(f"{text} is not a folder")
    return Path(real)


def check_links_inside(folder: Path, roots: Sequence[str]) -> None:
    """Refuses a folder holding a symlink that leads out of the roots (e.g. weights -> /etc)."""
    for entry in os.scandir(folder):
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not any(is_within(target, root) for root in roots):
                raise ModelPathForbidden(f"{folder}/{entry.name} is a link to {target}, "
                                         f"outside the allowed model roots "
                                         f"({', '.join(roots)})")


# -- what -----------------------------------------------------------------------------------


def has_tokenizer(names: Iterable[str]) -> bool:
    return any(name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES) for name in names)


def is_weight_name(name: str) -> bool:
    return name.startswith("model") and name.endswith(".safetensors")


def looks_like_model(names: Iterable[str]) -> bool:
    """A cheap test on file names alone, for scans: config, mlx-lm weights and a tokenizer."""
    names = set(names)
    return ("config.json" in names and any(map(is_weight_name, names))
            and has_tokenizer(names))


def validate_model_folder(folder: Path) -> ModelFolder:
    """What mlx-lm needs to load `folder`, checked without loading it; else why not."""
    try:
        return _inspect(folder)
    except InvalidModelFiles as error:
        raise InvalidModelPath(f"{folder} is not a loadable model: {error}") from None
    except OSError as error:
        raise InvalidModelPath(f"{folder} cannot be read: {error.strerror or error}") from None


def _inspect(folder: Path) -> ModelFolder:
    if not folder.is_dir():
        raise InvalidModelFiles("it is not a folder")
    names = [entry.name for entry in os.scandir(folder)]
    config = read_config(folder)
    if not isinstance(config.get("model_type"), str):
        raise InvalidModelFiles("config.json has no model_type")
    if not any(map(is_weight_name, names)):
        raise InvalidModelFiles("no model*.safetensors weight files (what mlx-lm loads)")
    if not has_tokenizer(names):
        raise InvalidModelFiles("no tokenizer files (tokenizer.json, tokenizer.model, "
                                "vocab.json or *.tiktoken)")
    files = tuple(weight_files(folder))
    for path in files:
        safetensors_header(path)
    return ModelFolder(path=folder, config=config, kind=kind_of_config(config),
                       weight_files=files)
