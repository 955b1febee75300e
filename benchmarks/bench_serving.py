"""Serving under concurrency: our Jupyter extension vs mlx_lm.server vs in-process mlx-lm.

One run, on the bundled demo model, with the same fixed chat prompts (temperature 0):

1. our server: a real Jupyter server with the extension (started here, own runtime/data dirs,
   a token, loopback only), N streaming clients at once (async httpx, NDJSON);
2. the in-process limit: ``mlx_lm.stream_generate`` on the same prompts, one at a time, in a
   subprocess with OpenBLAS preloaded;
3. ``mlx_lm.server`` (OpenBLAS preloaded; it batches continuously too), the same clients through
   its OpenAI-compatible ``/v1/chat/completions`` streaming (SSE);
4. ``GET mlx/api/status`` latency on our server, idle and while 4 streams generate.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 HF_HUB_OFFLINE=1 \\
        .venv/bin/python benchmarks/bench_serving.py [--levels 1,2,4,8] [--requests 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import save, table  # noqa: E402
from live_server import free_port, start_server, stop_server  # noqa: E402

from mlx_jupyter.models.registry import DEMO_MODEL_PATH  # noqa: E402

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "What are three good habits for writing clean code?",
    "Describe the water cycle in simple words.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Explain what a priority queue is.",
    "List some fun things to do on a rainy day.",
]

IN_PROCESS = r"""
import json, sys, time
from mlx_lm import load, stream_generate
model, tokenizer = load(sys.argv[1])
prompts, max_tokens = json.loads(sys.argv[2]), int(sys.argv[3])
def run(text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True)
    start = time.perf_counter(); first = None; last = None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
        if first is None:
            first = time.perf_counter()
        last = r
    end = time.perf_counter()
    return {"ttft_ms": (first - start) * 1000, "e2e_ms": (end - start) * 1000,
            "tokens": last.generation_tokens, "decode_tps": last.generation_tps}
run(prompts[0])  # warm-up, not counted
print(json.dumps([run(p) for p in prompts]))
"""


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return float("nan") if not n else (ordered[n // 2] if n % 2 else
                                       (ordered[n // 2 - 1] + ordered[n // 2]) / 2)


# -- clients -------------------------------------------------------------------------------

async def ours_one(client: httpx.AsyncClient, url: str, text: str, max_tokens: int,
                   temperature: float = 0.0, seed: int | None = None) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "stream": True}
    start = time.perf_counter()
    first = None
    final: dict = {}
    async with client.stream("POST", url + "mlx/api/generate", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.strip():
                continue
            event = json.loads(line)
            if event.get("text") and first is None:
                first = time.perf_counter()
            if event.get("done"):
                final = event
    end = time.perf_counter()
    if final.get("finish_reason") not in ("stop", "length"):
        raise RuntimeError(f"our server answered {final}")
    usage, timings = final["usage"], final["timings"]
    prompt_tps = timings.get("prompt_tokens_per_second") or 0.0
    prefill_ms = usage["prompt_tokens"] / prompt_tps * 1000 if prompt_tps else 0.0
    return {"ttft_ms": ((first or end) - start) * 1000, "e2e_ms": (end - start) * 1000,
            "tokens": usage["completion_tokens"],
            "queue_ms": max(0.0, timings["ttft_ms"] - prefill_ms),
            "server_ttft_ms": timings["ttft_ms"]}


async def mlx_lm_one(client: httpx.AsyncClient, url: str, text: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    chunks = 0
    tokens = None
    async with client.stream("POST", url + "v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
    end = time.perf_counter()
    return {"ttft_ms": ((first or end) - start) * 1000, "e2e_ms": (end - start) * 1000,
            "tokens": tokens if tokens is not None else chunks, "queue_ms": None,
            "server_ttft_ms": None}


async def run_level(one, client: httpx.AsyncClient, url: str, concurrency: int,
                    requests: int, max_tokens: int) -> dict:
    """`requests` requests, at most `concurrency` in flight (each client takes the next)."""
    todo = iter(range(requests))
    results: list[dict] = []

    async def worker() -> None:
        for i in todo:
            results.append(await one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [r["ttft_ms"] for r in results]
    e2e = [r["e2e_ms"] for r in results]
    queue = [r["queue_ms"] for r in results if r["queue_ms"] is not None]
    server_ttft = [r["server_ttft_ms"] for r in results if r["server_ttft_ms"] is not None]
    return {"ttft50": p50(ttft), "ttft95": pct(ttft, 95), "e2e50": p50(e2e),
            "e2e95": pct(e2e, 95), "tps": sum(r["tokens"] for r in results) / wall,
            "queue50": p50(queue) if queue else None, "queue95": pct(queue, 95) if queue else None,
            "server_ttft50": p50(server_ttft) if server_ttft else None,
            "tokens": sum(r["tokens"] for r in results)}


async def bench_server(one, url: str, headers: dict, levels: list[int], requests: int,
                       max_tokens: int) -> dict[int, dict]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, timeout=300, limits=limits) as client:
        for text in PROMPTS[:2]:  # warm-up: loads the model, compiles; not counted
            await one(client, url, text, max_tokens)
        out = {}
        for n in levels:
            out[n] = await run_level(one, client, url, n, requests, max_tokens)
            print(json.dumps({"url": url, "concurrency": n, **out[n]}), flush=True)
        return out


async def status_latency(url: str, headers: dict, polls: int) -> dict:
    async with httpx.AsyncClient(headers=headers, timeout=60) as client:
        async def poll() -> float:
            start = time.perf_counter()
            response = await client.get(url + "mlx/api/status")
            response.raise_for_status()
            return (time.perf_counter() - start) * 1000

        for _ in range(5):
            await poll()
        idle = [await poll() for _ in range(polls)]

        # 4 streams kept running (each slot starts its next stream when one ends, at most 50
        # streams in all; temperature 1 with seeds, up to 512 tokens); poll meanwhile.
        stop = asyncio.Event()
        started = 0

        async def slot() -> None:
            nonlocal started
            while not stop.is_set() and started < 50:
                started += 1
                await ours_one(client, url, PROMPTS[started % len(PROMPTS)], 512, 1.0, started)

        slots = [asyncio.create_task(slot()) for _ in range(4)]
        await asyncio.sleep(0.3)  # let them start generating
        busy: list[float] = []
        while not all(s.done() for s in slots) and len(busy) < polls:
            busy.append(await poll())
        stop.set()
        await asyncio.gather(*slots)
    return {"idle": idle, "busy": busy}


def in_process(prompts: list[str], max_tokens: int) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LD_PRELOAD": OPENBLAS}
    result = subprocess.run([sys.executable, "-c", IN_PROCESS, str(DEMO_MODEL_PATH),
                             json.dumps(prompts), str(max_tokens)],
                            env=env, check=True, capture_output=True, text=True, timeout=600)
    return json.loads(result.stdout.strip().splitlines()[-1])


def start_mlx_lm_server(log_path: Path, timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LD_PRELOAD": OPENBLAS}
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(DEMO_MODEL_PATH),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(url + "v1/models", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop_process(process)
    raise RuntimeError(f"mlx_lm.server did not answer within {timeout} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def stopped_with_children(pid: int, stop) -> None:
    """Calls stop(), then makes sure every process the server started (model workers) is gone."""
    try:
        import psutil
        children = psutil.Process(pid).children(recursive=True)
    except Exception:  # psutil missing or the server already gone: just stop it
        children = []
    try:
        stop()
    finally:
        if children:
            _, alive = psutil.wait_procs(children, timeout=15)
            for child in alive:
                child.kill()
            psutil.wait_procs(alive, timeout=5)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--status-polls", type=int, default=100)
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    if not Path(OPENBLAS).exists():
        sys.exit(f"{OPENBLAS} is missing: apt-get install libopenblas0-pthread")
    began = time.perf_counter()

    scratch = Path(tempfile.mkdtemp(prefix="mlx-bench-serving-"))
    ours = theirs = status = None
    local: list[dict] = []
    server = mlx_server = None
    try:
        # 2. in-process limit first, while nothing else competes for the 2 cores.
        local = in_process(PROMPTS, args.max_tokens)
        print(json.dumps({"in_process": local}), flush=True)

        # 1 and 4. our server.
        server = start_server(scratch, scratch / "jupyter.log")
        headers = {"Authorization": f"token {server.token}"}
        ours = asyncio.run(bench_server(ours_one, server.url, headers, levels, args.requests,
                                        args.max_tokens))
        status = asyncio.run(status_latency(server.url, headers, args.status_polls))
        stopped_with_children(server.process.pid, lambda: stop_server(server))
        server = None

        # 3. mlx_lm.server.
        mlx_server, url = start_mlx_lm_server(scratch / "mlx_lm_server.log")
        theirs = asyncio.run(bench_server(mlx_lm_one, url, {}, levels, args.requests,
                                          args.max_tokens))
    finally:
        if server is not None:
            stopped_with_children(server.process.pid, lambda: stop_server(server))
        if mlx_server is not None:
            stopped_with_children(mlx_server.pid, lambda: stop_process(mlx_server))
        shutil.rmtree(scratch, ignore_errors=True)

    ttft = [r["ttft_ms"] for r in local]
    e2e = [r["e2e_ms"] for r in local]
    tokens = sum(r["tokens"] for r in local)
    local_tps = tokens / (sum(e2e) / 1000)
    body = "All times in ms; tok/s = output tokens per second; ratio = ours / mlx_lm.server.\n\n"
    rows = []
    for n in levels:
        a, b = ours[n], theirs[n]
        rows.append([n, a["ttft50"], b["ttft50"], ratio(a["ttft50"], b["ttft50"]),
                     a["ttft95"], b["ttft95"], ratio(a["ttft95"], b["ttft95"]),
                     a["e2e50"], b["e2e50"], ratio(a["e2e50"], b["e2e50"]),
                     a["e2e95"], b["e2e95"], ratio(a["e2e95"], b["e2e95"]),
                     a["tps"], b["tps"], ratio(a["tps"], b["tps"]),
                     a["queue50"], a["queue95"], a["server_ttft50"]])
    body += table(["clients", "TTFT p50 ours", "TTFT p50 mlx_lm", "ratio",
                   "TTFT p95 ours", "TTFT p95 mlx_lm", "ratio",
                   "e2e p50 ours", "e2e p50 mlx_lm", "ratio",
                   "e2e p95 ours", "e2e p95 mlx_lm", "ratio",
                   "tok/s ours", "tok/s mlx_lm", "ratio",
                   "queue p50 ours", "queue p95 ours", "server-side TTFT p50 ours"], rows)
    body += "\n\nOutput tokens per level: " + ", ".join(
        f"{n} clients ours {ours[n]['tokens']} / mlx_lm.server {theirs[n]['tokens']}"
        for n in levels) + "."

    body += "\n\nIn-process limit, `mlx_lm.stream_generate`, one request at a time:\n\n" + table(
        ["requests", "TTFT p50", "TTFT p95", "e2e p50", "e2e p95", "tok/s", "output tokens"],
        [[len(local), p50(ttft), pct(ttft, 95), p50(e2e), pct(e2e, 95), local_tps, tokens]])

    idle, busy = status["idle"], status["busy"]
    body += "\n\n`GET mlx/api/status` latency (ms):\n\n" + table(
        ["state", "samples", "p50", "p99", "max"],
        [["idle", len(idle), p50(idle), pct(idle, 99), max(idle)],
         ["4 streams generating", len(busy), p50(busy), pct(busy, 99),
          max(busy) if busy else float("nan")]])

    body += f"""

How each figure is measured (demo model, {len(PROMPTS)} fixed chat prompts cycled, temperature 0,
max_tokens {args.max_tokens}, {args.requests} requests per level, a closed loop of N clients
each sending its next request when the last ends; 2 warm-up requests per server not counted):

- TTFT and e2e are client-side: from sending the POST to the first non-empty text piece, and to
  the end of the stream (our NDJSON `done` line; mlx_lm.server's `data: [DONE]`). p50 is the
  median, p95/p99 nearest-rank.
- tok/s for the servers: all output tokens of a level (our `usage.completion_tokens`;
  mlx_lm.server's streamed `usage`, `stream_options.include_usage`) divided by the level's wall
  time. In-process: all tokens over the sum of the one-at-a-time generation times (a model
  loaded in this process, no HTTP; one warm-up call not counted); TTFT there is from calling
  `stream_generate` (chat template already applied) to its first response.
- server-side TTFT (ours): `timings.ttft_ms` from the `done` line, request submitted to the
  queue to first text; client TTFT minus it is the HTTP handler's own time before submitting
  (parsing, the history write) plus the network hop.
- queue (ours): the server's own `timings.ttft_ms` (submission to first text) minus the worker's
  prefill time, `usage.prompt_tokens / timings.prompt_tokens_per_second` (the worker measures
  admission to first token). So it is the wait in the priority queue and in the worker's
  waiting list plus IPC -- an approximation.
- Output lengths may differ between the servers (greedy decoding, but different batching
  numerics and stop handling), which the tok/s figures account for and e2e does not.
- status latency: sequential GETs from one client, {args.status_polls} while idle, then as many
  as fit (at most {args.status_polls}) while 4 streams of up to 512 tokens (temperature 1,
  seeded; a slot starts a new stream when its last one ends, at most 50 in all) run on the same
  server.
- Nothing queued in our server's priority queue at these levels (max_batch_size 8 >= clients),
  so queue is ~0: the worker's own "prefill" time runs from admission into its batch to the
  first token and so already includes waiting for the batch's current step; negative
  differences (IPC, rounding) are clamped to 0.
- Both servers run workers with OpenBLAS preloaded (ours by its `preload_openblas` setting);
  the client runs in the same 2-core machine, so it competes with the servers for CPU.
- Small samples on 2 shared cores: repeated runs differ by tens of percent (tok/s, p50s) and
  p95s are set by one or two requests; read the ratios as rough. Anything else running on the
  machine (e.g. a test suite) skews them further.
- Total benchmark wall time: {time.perf_counter() - began:.0f} s.
"""
    save("serving", "Serving under concurrency: ours vs mlx_lm.server vs in-process", body,
         ("LD_PRELOAD=" + OPENBLAS + " HF_HUB_OFFLINE=1 python benchmarks/bench_serving.py "
          + " ".join(sys.argv[1:])).rstrip())


if __name__ == "__main__":
    main()
