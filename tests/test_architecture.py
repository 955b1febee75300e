"""The rules of the house that docs/architecture.md states, checked on the import graph.

Every import counts, at module level or inside a function: a lazy import still runs in the
process that calls it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_jupyter"
# What runs only in a model worker's process: the one place MLX may be imported.
WORKER_MODULES = {"mlx_jupyter.engine.worker", "mlx_jupyter.engine.batching",
                  "mlx_jupyter.engine.memory_guard", "mlx_jupyter.engine.sampling",
                  "mlx_jupyter.engine.grammar.processor"}
WEB = ("tornado", "jupyter_server")
MLX = ("mlx", "mlx_lm")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            # `from . import render` imports the module mlx_jupyter.kernel.render.
            found |= {f"{stem}.{alias.name}" for alias in node.names}
    return found


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def within(module: str, roots: tuple[str, ...]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def modules_under(*prefixes: str) -> list[str]:
    return sorted(m for m in GRAPH if within(m, tuple(f"mlx_jupyter.{p}" for p in prefixes)))


def test_the_graph_sees_the_package():
    assert {"mlx_jupyter.app", "mlx_jupyter.engine.worker", "mlx_jupyter.kernel.magics"} <= set(GRAPH)
    assert "mlx.core" in GRAPH["mlx_jupyter.engine.worker"]


@pytest.mark.parametrize("module", modules_under("queue", "models", "engine", "store",
                                                 "contracts", "services", "limits", "errors",
                                                 "metrics"))
def test_nothing_below_the_api_imports_the_web_server(module):
    assert not {i for i in GRAPH[module] if within(i, WEB)}


@pytest.mark.parametrize("module", modules_under("kernel"))
def test_the_kernel_side_imports_neither_the_server_nor_mlx(module):
    assert not {i for i in GRAPH[module] if within(i, WEB + MLX)}
    assert not {i for i in GRAPH[module] if within(i, ("mlx_jupyter.api", "mlx_jupyter.queue",
                                                       "mlx_jupyter.models", "mlx_jupyter.store",
                                                       "mlx_jupyter.app"))}


def reachable(start: str) -> set[str]:
    """Our modules that importing `start` may import, following our own imports."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in GRAPH:
            continue
        seen.add(module)
        todo += [i for i in GRAPH[module] if i.startswith("mlx_jupyter")]
    return seen


def test_the_server_process_never_imports_mlx():
    server = reachable("mlx_jupyter.app") | reachable("mlx_jupyter")
    assert server & WORKER_MODULES == set(), "the server imports a worker module"
    for module in server:
        assert not {i for i in GRAPH[module] if within(i, MLX)}, f"{module} imports mlx"


def test_only_worker_modules_import_mlx():
    importers = {m for m, found in GRAPH.items() if any(within(i, MLX) for i in found)}
    assert importers == WORKER_MODULES


def test_layers_point_one_way():
    lower = {"store": ("api", "queue", "models", "engine", "app"),
             "models": ("api", "queue", "app"), "engine": ("api", "queue", "models", "app"),
             "queue": ("api", "app"), "contracts": ("api", "queue", "models", "engine", "store",
                                                    "app", "kernel")}
    for layer, above in lower.items():
        for module in modules_under(layer):
            upward = {i for i in GRAPH[module]
                      if within(i, tuple(f"mlx_jupyter.{a}" for a in above))}
            assert not upward, f"{module} imports from a layer above it: {upward}"
