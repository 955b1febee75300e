"""What a test does when something it needs cannot be had here (a package, a binary): it skips,
saying why; under CI (`CI=true`, which .ci/run sets) it fails with the same reason, so that a CI
run cannot pass without the suites it was meant to run."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str, *, module: bool = False) -> NoReturn:
    """Skips the test (with `module`, the whole module, at import), or fails it under CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a suite that cannot run fails instead of skipping)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=module)
