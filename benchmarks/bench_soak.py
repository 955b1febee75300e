"""Soak: thousands of mixed requests against a live server, and what its processes hold.

A real Jupyter server with the extension serves a random-weight Llama (4 layers, 256 wide,
~16 MB of float32 weights, the demo's tokenizer) to 8 concurrent clients: short prompts, long
prompts (~150 tokens), and chat conversations whose every turn resends the conversation so far
(prompt-cache hits), half of them streamed. Every `--interval` requests it prints the server's
and the worker's resident memory, open descriptors and threads, beside the prompt cache's own
count of its bytes and MLX's active and cache memory (the worker's report).

The same load runs twice in one go: with the prompt cache (the default) and, as the baseline,
without it (`prompt_cache_bytes=0`): the memory a worker needs for the model and the batch
alone. The bound to hold: the worker's RSS after the run, less its RSS after the warm-up, within
prompt_cache_bytes + the KV reservation + worker_base_memory (what the server counts for it
beyond its weights).

    .venv/bin/python benchmarks/bench_soak.py [--requests 2000] [--interval 250]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import save, table  # noqa: E402
from live_server import start_server, stop_server  # noqa: E402
from model_factory import make_model  # noqa: E402

MIB = 1024**2
MODEL = "soak"
WARM_UP = 20
CONCURRENCY = 8
WORDS = ("river stone cloud notebook kernel garden window lantern harbour meadow copper violet "
         "signal thunder paper orbit valley ember quartz willow").split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


class Load:
    """The mixed requests, made up in order from one seed: the same in both runs."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.conversations: list[list[dict[str, str]]] = []

    def next(self, i: int) -> dict:
        rng = self.rng
        body = {"model": MODEL, "max_tokens": 12, "temperature": 0.8, "seed": i,
                "stream": i % 2 == 0}
        kind = rng.random()
        if kind < 0.4:
            body["prompt"] = words(rng, rng.randint(3, 12))
        elif kind < 0.6:
            body["prompt"] = words(rng, 120)
        else:  # a chat turn: a conversation so far, and a new question
            if not self.conversations or rng.random() < 0.2 or len(self.conversations[-1]) > 8:
                self.conversations.append([{"role": "system", "content": words(rng, 30)}])
            conversation = rng.choice(self.conversations[-4:])
            conversation.append({"role": "user", "content": words(rng, rng.randint(4, 10))})
            body["messages"] = list(conversation)
            # The answer is not known yet; a fixed reply keeps the next turn's prefix cached.
            conversation.append({"role": "assistant", "content": words(rng, 6)})
        return body


async def send(client: httpx.AsyncClient, body: dict) -> None:
    if body["stream"]:
        async with client.stream("POST", "mlx/api/generate", json=body) as answer:
            answer.raise_for_status()
            async for _ in answer.aiter_lines():
                pass
    else:
        (await client.post("mlx/api/generate", json=body)).raise_for_status()


def peak_rss(pid: int) -> int:
    """The highest resident memory a process has had (Linux's VmHWM); 0 where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample(server, done: int) -> dict:
    headers = {"Authorization": f"token {server.token}"}
    model = httpx.get(f"{server.url}mlx/api/models/{MODEL}", headers=headers, timeout=30).json()
    metrics = httpx.get(f"{server.url}mlx/metrics", headers=headers, timeout=30).text
    trims = re.search(rf'mlx_jupyter_prompt_cache_trims_total\{{model="{MODEL}"\}} (\S+)',
                      metrics)
    server_process, worker = psutil.Process(server.process.pid), psutil.Process(model["pid"])
    live = model["live"] or {}
    return {"requests": done,
            "server_rss": server_process.memory_info().rss,
            "server_fds": server_process.num_fds(), "server_threads": server_process.num_threads(),
            "worker_rss": worker.memory_info().rss, "worker_peak": peak_rss(worker.pid),
            "worker_fds": worker.num_fds(),
            "worker_threads": worker.num_threads(),
            "prompt_cache": live.get("prompt_cache_bytes", 0),
            "entries": live.get("prompt_cache_entries", 0),
            "mlx_active": live.get("mlx_active_bytes", 0),
            "mlx_cache": live.get("mlx_cache_bytes", 0),
            "trims": float(trims.group(1)) if trims else 0.0,
            "footprint": model["footprint"]}


async def soak(server, requests: int, interval: int, seed: int) -> list[dict]:
    load = Load(seed)
    samples: list[dict] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(WARM_UP + requests):
        queue.put_nowait(i)
    done = 0
    checkpoints: asyncio.Queue[int] = asyncio.Queue()
    bodies = [load.next(i) for i in range(WARM_UP + requests)]
    headers = {"Authorization": f"token {server.token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=300) as client:
        async def client_loop() -> None:
            nonlocal done
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await send(client, bodies[i])
                done += 1
                if done == WARM_UP or (done > WARM_UP and (done - WARM_UP) % interval == 0):
                    checkpoints.put_nowait(done - WARM_UP)

        async def sampler() -> None:
            # Taken while the next requests run, off the event loop of the clients.
            while True:
                mark = await checkpoints.get()
                samples.append(await asyncio.to_thread(sample, server, mark))

        tasks = [asyncio.create_task(client_loop()) for _ in range(CONCURRENCY)]
        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*tasks)
        while not checkpoints.empty():
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the worker's report after the last request
        sampling.cancel()
        samples.append(await asyncio.to_thread(sample, server, done - WARM_UP))
    return samples


def run(label: str, model_dir: Path, extra: tuple[str, ...], requests: int, interval: int,
        seed: int) -> tuple[list[dict], float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        server = start_server(root, root / "server.log", args=(
            f"--MlxApp.model_dirs={model_dir}", "--MlxApp.idle_unload_seconds=0", *extra))
        try:
            started = time.perf_counter()
            samples = asyncio.run(soak(server, requests, interval, seed))
            seconds = time.perf_counter() - started
        finally:
            stop_server(server)
    print(f"{label}: {requests} requests in {seconds:.0f} s", flush=True)
    return samples, seconds


def rows(label: str, samples: list[dict]) -> list[list[object]]:
    out = []
    # The last sample of a count wins: the one taken once the load had ended.
    for s in {s["requests"]: s for s in samples}.values():
        out.append([label, s["requests"], s["server_rss"] / MIB, s["worker_rss"] / MIB,
                    s["worker_peak"] / MIB, s["footprint"]["total_bytes"] / MIB,
                    s["prompt_cache"] / MIB, s["entries"], s["mlx_active"] / MIB,
                    s["mlx_cache"] / MIB, s["server_fds"], s["server_threads"],
                    s["worker_fds"], s["worker_threads"], int(s["trims"])])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        make_model(model_dir / MODEL, hidden=256, layers=4)
        runs = {"prompt cache on": (), "baseline: cache off": ("--MlxApp.prompt_cache_bytes=0",)}
        results = {label: run(label, model_dir, extra, args.requests, args.interval, args.seed)
                   for label, extra in runs.items()}

    headers = ["run", "requests", "server RSS MiB", "worker RSS MiB", "worker peak MiB",
               "estimate MiB", "prompt cache MiB",
               "entries", "MLX active MiB", "MLX cache MiB", "server fds", "server threads",
               "worker fds", "worker threads", "trims"]
    body_rows = [row for label, (samples, _) in results.items() for row in rows(label, samples)]
    summary = []
    for label, (samples, seconds) in results.items():
        warm, last = samples[0], samples[-1]
        footprint = last["footprint"]
        bound = (footprint["prompt_cache_bytes"] + footprint["kv_reserve_bytes"]
                 + footprint["worker_bytes"])
        grown = last["worker_rss"] - warm["worker_rss"]
        summary.append([label, args.requests, seconds, args.requests / seconds,
                        warm["worker_rss"] / MIB, last["worker_rss"] / MIB, grown / MIB,
                        bound / MIB, "yes" if grown <= bound else "NO",
                        (last["server_rss"] - warm["server_rss"]) / MIB])
    body = (table(headers, body_rows) + "\n\n" + table(
        ["run", "requests", "seconds", "requests/s", "worker RSS after warm-up MiB",
         "worker RSS at end MiB", "growth MiB", "bound MiB", "within", "server growth MiB"],
        summary))
    save("soak", "Soak: memory, descriptors and threads over mixed requests", body,
         "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
