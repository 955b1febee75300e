"""Model registry and memory estimates: uncached vs cached, side by side in one run.

Folders of about 1,000 files, in both shapes: one weight file among 999 others, and 1,000
weight shards. "Uncached" means our cache is empty; the OS page cache is warm in both columns,
so the ratios show the work our caches save, not disk latency. Then registry rescans (model
folders, a Hugging Face cache) first vs unchanged, and, unless --no-workers, the real load and
unload of the demo model in a worker process with its resident memory next to the estimate.

    .venv/bin/python benchmarks/bench_models.py [--repeats 30] [--no-workers]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import median, save, table  # noqa: E402
from model_factory import backdate, make_hf_cache_repo, make_model  # noqa: E402

from mlx_jupyter.models.memory import MemoryEstimator, process_rss  # noqa: E402
from mlx_jupyter.models.registry import DEMO_MODEL_PATH, ModelRegistry  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
MIB = 1024 * 1024


def timed(operation: Callable[[], object], repeats: int,
          before: Callable[[], object] | None = None) -> float:
    """Median seconds of one call, `before` (untimed) running ahead of each."""
    times = []
    for _ in range(repeats):
        if before:
            before()
        started = time.perf_counter()
        operation()
        times.append(time.perf_counter() - started)
    return median(times)


def comparison(what: str, operation: str, uncached: float, cached: float) -> list[object]:
    return [what, operation, uncached * 1e6, cached * 1e6, uncached / cached,
            f"{(1 - cached / uncached) * 100:.1f}%"]


def build_folders(tmp: Path) -> dict[str, Path]:
    root = tmp / "allowed"
    one_file = make_model(root / "one-weight-file", hidden=256, layers=4, extra_files=995)
    # 111 layers × 9 tensors + 2 = 1,001 tensors, enough for 1,000 shards of one tensor or two.
    shards = make_model(root / "thousand-shards", hidden=32, layers=111, shards=1000)
    return {f"1 weight file + {count_files(one_file.path) - 1:,} others": one_file.path,
            f"{len(shards.weight_files):,} weight shards + "
            f"{count_files(shards.path) - len(shards.weight_files)} others": shards.path}


def count_files(folder: Path) -> int:
    return sum(1 for _ in os.scandir(folder))


def bench_folders(folders: dict[str, Path], roots: list[Path], repeats: int) -> list[list]:
    rows = []
    for label, folder in folders.items():
        estimator = MemoryEstimator()
        rows.append(comparison(label, "memory estimate", timed(
            lambda: estimator.estimate(folder), repeats, lambda: estimator.invalidate()),
            timed(lambda: estimator.estimate(folder), repeats * 10)))
        registry = ModelRegistry(allowed_roots=roots, hf_cache=False)
        registry.register("m", str(folder))
        rows.append(comparison(label, "path resolution", timed(
            lambda: registry.resolve("m"), repeats, registry.clear_caches),
            timed(lambda: registry.resolve("m"), repeats * 10)))
        rows.append([label, "os.walk + stat every file (the seed's uncached size)",
                     timed(lambda: walk_size(folder), repeats) * 1e6, "", "", ""])
    return rows


def walk_size(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(top, name))
               for top, _, names in os.walk(folder) for name in names)


def bench_scans(tmp: Path, repeats: int) -> list[list]:
    source = make_model(tmp / "source", hidden=64, layers=2)
    model_dir = tmp / "model-dirs"
    for i in range(50):
        make_model(model_dir / f"model-{i:02d}", hidden=32, layers=1)
    cache = tmp / "hub"
    for i in range(20):
        make_hf_cache_repo(cache, f"mlx-community/model-{i:02d}", source.path)
    backdate(model_dir)
    backdate(cache)
    rows = []
    for label, options in (("model_dirs: 50 model folders", {"model_dirs": [model_dir],
                                                             "hf_cache": False}),
                           ("Hugging Face cache: 20 repos", {"hf_cache_dir": cache})):
        registry = ModelRegistry(**options)
        registry.refresh()
        rows.append(comparison(label, "refresh(): first scan vs nothing changed", timed(
            registry.refresh, repeats, registry.clear_caches), timed(registry.refresh, repeats)))
    return rows


async def bench_worker(repeats: int) -> list[list]:
    from mlx_jupyter.engine.proxy import WorkerProxy, worker_environment

    env = worker_environment(OPENBLAS if Path(OPENBLAS).exists() else None)
    estimate = MemoryEstimator().estimate(DEMO_MODEL_PATH)
    rows = []
    for _ in range(repeats):
        proxy = WorkerProxy("demo", DEMO_MODEL_PATH, env=env)
        started = time.perf_counter()
        await proxy.start()
        start_s = time.perf_counter() - started
        rss = process_rss(proxy.pid) or 0
        started = time.perf_counter()
        await proxy.stop()
        stop_s = time.perf_counter() - started
        rows.append([start_s * 1e3, proxy.load_ms or 0.0, stop_s * 1e3, rss / MIB,
                     estimate.weight_bytes / MIB, estimate.estimate_bytes / MIB])
    return [[f"median of {repeats}", *(median([row[i] for row in rows]) for i in range(6))]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-workers", action="store_true",
                        help="skip starting real model workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folders = build_folders(tmp)
        folder_rows = bench_folders(folders, [tmp / "allowed"], args.repeats)
        scan_rows = bench_scans(tmp, max(3, args.repeats // 3))
    sections = [
        "## Memory estimate and path resolution, folders of ~1,000 files\n\n"
        "Uncached: our cache empty (estimate: list the folder, read config.json and every "
        "safetensors header; resolution: realpath, roots, links, config, tokenizer, headers). "
        "Cached: a fingerprint check (stat of the folder, config and weight files) for the "
        "estimate, one stat of the folder for the resolution. Median µs per call.\n\n"
        + table(["folder", "operation", "uncached µs", "cached µs", "× faster", "time saved"],
                folder_rows),
        "## Registry rescans (median µs per refresh)\n\n"
        + table(["source", "operation", "first µs", "unchanged µs", "× faster", "time saved"],
                scan_rows),
    ]
    if not args.no_workers:
        worker_rows = asyncio.run(bench_worker(3))
        sections.append(
            "## Demo model in a real worker process (OpenBLAS preloaded when present)\n\n"
            "Start: spawn, import mlx, load; RSS: the worker's resident memory when idle, "
            "which is mostly the Python and mlx runtime for a model this small.\n\n"
            + table(["runs", "start ms", "load ms (worker)", "stop ms", "RSS MiB",
                     "weights MiB", "estimate MiB"], worker_rows))
    save("models", "Model registry and memory estimates: uncached vs cached",
         "\n\n".join(sections), "python benchmarks/bench_models.py")


if __name__ == "__main__":
    main()
