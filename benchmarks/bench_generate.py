"""Generation speed in a model worker with mlx's bundled BLAS vs Debian's OpenBLAS preloaded.

Both run through the real engine (WorkerProxy -> worker process), side by side in one run, on
the bundled demo model and on a randomly initialised larger Llama built on the fly (random
weights decode at the same speed as trained ones; the demo is too small for BLAS to matter
much). Each worker gets the environment the server gives it (`WorkerSettings.environment`:
OPENBLAS_NUM_THREADS=1 for a model as small as the demo, the library's default for the others)
and keeps its prompt cache; every run's prompt starts with its own number, so no run finds more
of it in the cache than the beginning-of-text token every prompt starts with (checked:
`usage.cached_tokens` is at most 1).

    .venv/bin/python benchmarks/bench_generate.py [--repeats 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OPENBLAS, build_random_llama, median, save, table  # noqa: E402

from mlx_jupyter.engine.proxy import WorkerProxy, worker_environment  # noqa: E402
from mlx_jupyter.models.manager import WorkerSettings  # noqa: E402
from mlx_jupyter.models.memory import MemoryEstimator  # noqa: E402
from mlx_jupyter.models.registry import DEMO_MODEL_PATH  # noqa: E402

PROMPT = ("In the quiet town by the river, people keep small gardens and share the bread they "
          "bake. Every morning the baker opens the shop and the children walk to school. ") * 3

async def measure(path: Path, blas: str | None, repeats: int, max_tokens: int) -> dict:
    estimate = MemoryEstimator().estimate(path).estimate_bytes
    env = WorkerSettings(env=worker_environment(blas)).environment(estimate)
    proxy = WorkerProxy(path.name, path, env=env)
    await proxy.start()
    prompt_tps, decode_tps = [], []
    try:
        for i in range(repeats + 1):  # the first run warms up and is not counted
            params = {"prompt": f"{i}. {PROMPT}", "messages": None, "max_tokens": max_tokens,
                      "temperature": 1.0, "top_p": 1.0, "seed": i, "stop": []}
            async for message in proxy.generate(f"bench-{i}", params):
                if "done" in message and message.get("usage", {}).get("cached_tokens", 0) > 1:
                    raise RuntimeError(f"run {i} found its prompt in the cache: {message}")
                if "done" in message and i > 0:
                    prompt_tps.append(message["timings"]["prompt_tokens_per_second"])
                    decode_tps.append(message["timings"]["tokens_per_second"])
    finally:
        await proxy.stop()
    return {"load_s": (proxy.load_ms or 0) / 1000, "prompt": median(prompt_tps),
            "decode": median(decode_tps)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    if not Path(OPENBLAS).exists():
        sys.exit(f"{OPENBLAS} is missing: apt-get install libopenblas0-pthread")

    scratch = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
    try:
        models = [("demo (bundled)", DEMO_MODEL_PATH)]
        for hidden, layers in [(512, 8), (1024, 12)]:
            params = build_random_llama(scratch / f"llama-{hidden}x{layers}", hidden, layers)
            models.append((f"random Llama {params / 1e6:.0f}M fp32",
                           scratch / f"llama-{hidden}x{layers}"))
        rows = []
        for label, path in models:
            bundled = await measure(path, None, args.repeats, args.max_tokens)
            openblas = await measure(path, OPENBLAS, args.repeats, args.max_tokens)
            rows.append([label, bundled["prompt"], openblas["prompt"],
                         f"{openblas['prompt'] / bundled['prompt']:.1f}x",
                         bundled["decode"], openblas["decode"],
                         f"{openblas['decode'] / bundled['decode']:.1f}x"])
            print(json.dumps({"model": label, "bundled": bundled, "openblas": openblas}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    body = table(["model", "prompt tok/s bundled BLAS", "prompt tok/s OpenBLAS", "ratio",
                  "decode tok/s bundled BLAS", "decode tok/s OpenBLAS", "ratio"], rows)
    body += (f"\n\nMedian of {args.repeats} runs after one warm-up; prompt of "
             f"~{len(PROMPT.split())} words, new to each run, up to {args.max_tokens} new "
             "tokens, temperature 1. Each worker runs with the BLAS threads the server gives it "
             "(one for the demo, the library's default for the others) and its prompt cache.")
    save("generate_blas", "Generation speed in a model worker: bundled BLAS vs OpenBLAS", body,
         " ".join(["python benchmarks/bench_generate.py", *sys.argv[1:]]))


if __name__ == "__main__":
    asyncio.run(main())
