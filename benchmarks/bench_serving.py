"""Serving under concurrency: our Jupyter extension vs mlx_lm.server vs in-process mlx-lm.

One run, on two models (the bundled demo, and a random-weight Llama of about 100M parameters
made here), with the same chat prompts (temperature 0):

1. our server: a real Jupyter server with the extension as the product runs it (default
   settings: its model worker gets OpenBLAS and the BLAS thread count `blas_threads` picks, and
   keeps a prompt cache), N streaming clients at once (async httpx, NDJSON);
2. the in-process limit: ``mlx_lm.stream_generate`` on the same prompts, one at a time, in a
   subprocess;
3. ``mlx_lm.server`` (it batches continuously too, and keeps a prompt cache of its own), the
   same clients through its OpenAI-compatible ``/v1/chat/completions`` streaming (SSE);

so that a ratio measures serving alone, the baselines get what our worker gets: the BLAS
library and thread count read from our worker's environment (LD_PRELOAD, OPENBLAS_NUM_THREADS)
for each model, and every request's prompt is new (a unique number first, then one of 8 texts),
so that no prompt cache saves anyone a prefill (our answers' cached_tokens are reported);
4. ``GET mlx/api/status`` latency on our server, idle and while 4 streams of the demo generate
   (the streams come from another process, so the poller's own loop is not the one parsing
   them);
5. submit-to-admitted: the server's own ``timings.queue_ms`` (submission to admission into the
   model's batch), with free capacity at every level here.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_serving.py [--levels 1,2,4,8] \\
        [--models demo,llama100m] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import multiprocessing
from dataclasses import dataclass

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import OPENBLAS, build_random_llama, save, stop_process, table  # noqa: E402
from live_server import free_port, start_server, stop_server  # noqa: E402

from mlx_jupyter.models.registry import DEMO_MODEL_PATH  # noqa: E402


@dataclass
class BenchModel:
    name: str  # the name our server knows it by
    label: str
    path: Path
    requests: int  # per concurrency level
    max_tokens: int


# The random Llama: hidden 1024, 8 layers, the demo's 2048-token vocabulary (about 105M).
LLAMA_100M = (1024, 8)
TEXTS = [
    "Tell me a short story about a lighthouse keeper.",
    "What are three good habits for writing clean code?",
    "Describe the water cycle in simple words.",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "Give me a recipe idea for a quick vegetarian dinner.",
    "Explain what a priority queue is.",
    "List some fun things to do on a rainy day.",
]
BLAS_VARIABLES = ("LD_PRELOAD", "OPENBLAS_NUM_THREADS")


def unique_prompts(tag: str, count: int) -> list[str]:
    """`count` prompts no server has seen: a number made from the tag first (so that prompts
    share no prefix beyond the chat template's), then the texts in turn."""
    return [f"{hashlib.sha256(f'{tag} {i}'.encode()).hexdigest()[:8]}: {TEXTS[i % len(TEXTS)]}"
            for i in range(count)]


def level_tag(round_number: int, concurrency: int) -> str:
    """The prompts of one level of one round: the same for every side, new to each."""
    return f"round {round_number}, {concurrency} clients"

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

async def ours_one(client: httpx.AsyncClient, url: str, model: str, text: str, max_tokens: int,
                   temperature: float = 0.0, seed: int | None = None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
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
    return {"ttft_ms": ((first or end) - start) * 1000, "e2e_ms": (end - start) * 1000,
            "tokens": usage["completion_tokens"], "queue_ms": timings["queue_ms"],
            "server_ttft_ms": timings["ttft_ms"], "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["cached_tokens"]}


async def mlx_lm_one(client: httpx.AsyncClient, url: str, model: str, text: str,
                     max_tokens: int) -> dict:
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
            "server_ttft_ms": None, "prompt_tokens": None, "cached_tokens": None}


async def run_level(one, client: httpx.AsyncClient, url: str, model: BenchModel,
                    concurrency: int, prompts: list[str], cpu_seconds=None) -> dict:
    """The prompts, at most `concurrency` in flight (each client takes the next). With
    cpu_seconds (a function giving CPU seconds used so far), also the CPU those used per
    second of the level, in cores."""
    todo = iter(prompts)
    results: list[dict] = []

    async def worker() -> None:
        for text in todo:
            results.append(await one(client, url, model.name, text, model.max_tokens))

    cpu_before = cpu_seconds() if cpu_seconds else 0.0
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    cpu_share = (cpu_seconds() - cpu_before) / wall if cpu_seconds else None
    ttft = [r["ttft_ms"] for r in results]
    e2e = [r["e2e_ms"] for r in results]
    queue = [r["queue_ms"] for r in results if r["queue_ms"] is not None]
    server_ttft = [r["server_ttft_ms"] for r in results if r["server_ttft_ms"] is not None]
    return {"ttft50": p50(ttft), "ttft95": pct(ttft, 95), "e2e50": p50(e2e),
            "e2e95": pct(e2e, 95), "tps": sum(r["tokens"] for r in results) / wall,
            "queue50": p50(queue) if queue else None, "queue95": pct(queue, 95) if queue else None,
            "server_ttft50": p50(server_ttft) if server_ttft else None,
            "tokens": sum(r["tokens"] for r in results), "cpu_share": cpu_share,
            "prompt_tokens": _sum_of(results, "prompt_tokens"),
            "cached_tokens": _sum_of(results, "cached_tokens")}


def _sum_of(results: list[dict], key: str) -> int | None:
    return None if results[0][key] is None else sum(r[key] for r in results)


async def bench_server(one, url: str, headers: dict, levels: list[int], model: BenchModel,
                       round_number: int, cpu_seconds=None) -> dict[int, dict]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        # Warm-up: loads the model, compiles; not counted.
        for text in unique_prompts(f"round {round_number}, warm-up", 2):
            await one(client, url, model.name, text, model.max_tokens)
        out = {}
        for n in levels:
            prompts = unique_prompts(level_tag(round_number, n), model.requests)
            out[n] = await run_level(one, client, url, model, n, prompts, cpu_seconds)
            print(json.dumps({"url": url, "model": model.name, "concurrency": n, **out[n]}),
                  flush=True)
        return out


def keep_streams_running(url: str, headers: dict, streams: int, ready, stop) -> None:
    """In a process of its own: `streams` demo streams at once, each slot starting its next
    stream (temperature 1, seeded, up to 512 tokens) when the last ends, until `stop` is set."""
    async def run() -> None:
        async with httpx.AsyncClient(headers=headers, timeout=600) as client:
            started = 0

            async def slot() -> None:
                nonlocal started
                while not stop.is_set():
                    started += 1
                    await ours_one(client, url, "demo", TEXTS[started % len(TEXTS)], 512,
                                   1.0, started)
                    ready.set()

            await asyncio.gather(*(slot() for _ in range(streams)))

    asyncio.run(run())


def status_latency(url: str, headers: dict, polls: int) -> dict:
    with httpx.Client(headers=headers, timeout=60) as client:
        def poll() -> float:
            start = time.perf_counter()
            client.get(url + "mlx/api/status").raise_for_status()
            return (time.perf_counter() - start) * 1000

        for _ in range(5):
            poll()
        idle = [poll() for _ in range(polls)]

        context = multiprocessing.get_context("spawn")
        ready, stop = context.Event(), context.Event()
        load = context.Process(target=keep_streams_running, args=(url, headers, 4, ready, stop))
        load.start()
        try:
            if not ready.wait(120):  # one stream has run end to end: all four are going
                raise RuntimeError("the 4 streams did not start")
            busy = []
            for _ in range(polls):
                busy.append(poll())
                time.sleep(0.01)  # a poller, not a flood: 100 polls take a few seconds
        finally:
            stop.set()
            load.join(120)
            if load.is_alive():
                load.kill()
    return {"idle": idle, "busy": busy}


def in_process(model: BenchModel, blas: dict[str, str | None], prompts: list[str],
               neighbour_share: float = 0.0) -> list[dict]:
    """The in-process limit, with our worker's BLAS; with neighbour_share, while another
    process keeps that share of a core busy (see `CPU_NEIGHBOUR`)."""
    env = with_blas({**os.environ, "HF_HUB_OFFLINE": "1"}, blas)
    neighbour = (subprocess.Popen([sys.executable, "-c", CPU_NEIGHBOUR, str(neighbour_share)])
                 if neighbour_share > 0 else None)
    try:
        result = subprocess.run([sys.executable, "-c", IN_PROCESS, str(model.path),
                                 json.dumps(prompts), str(model.max_tokens)],
                                env=env, check=True, capture_output=True, text=True,
                                timeout=1200)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    return json.loads(result.stdout.strip().splitlines()[-1])


# Busy for `share` of every millisecond, asleep for the rest: the CPU our HTTP server and the
# benchmark's client take from the model on these 2 cores, without their work.
CPU_NEIGHBOUR = r"""
import sys, time
share = min(float(sys.argv[1]), 0.95)
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < share / 1000:
        pass
    time.sleep((1 - share) / 1000)
"""


def server_and_client_cpu(server_pid: int):
    """CPU seconds used so far by the Jupyter server's own process (not its model workers) and
    by this one (the benchmark's client)."""
    import psutil

    processes = [psutil.Process(server_pid), psutil.Process()]

    def seconds() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in processes)
    return seconds


def worker_blas(url: str, headers: dict, model: str) -> dict[str, str | None]:
    """The BLAS our server's worker for the model runs with: it loads the model and reads the
    worker's environment."""
    httpx.post(url + f"mlx/api/models/{model}/load", headers=headers, json={},
               timeout=600).raise_for_status()
    loaded = httpx.get(url + "mlx/api/status", headers=headers, timeout=60).json()
    [pid] = [m["pid"] for m in loaded["models"]["loaded"] if m["name"] == model]
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0")
                         if b"=" in item)
    return {name: variables[name.encode()].decode() if name.encode() in variables else None
            for name in BLAS_VARIABLES}


def with_blas(env: dict[str, str], blas: dict[str, str | None]) -> dict[str, str]:
    """The environment with exactly our worker's BLAS variables (set, or absent)."""
    env = {key: value for key, value in env.items() if key not in blas}
    return {**env, **{key: value for key, value in blas.items() if value is not None}}


def start_mlx_lm_server(model_path: Path, log_path: Path, blas: dict[str, str | None],
                        timeout: float = 120.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = with_blas({**os.environ, "HF_HUB_OFFLINE": "1"}, blas)
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(model_path),
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



def level_rows(ours: dict[int, dict], theirs: dict[int, dict], levels: list[int]) -> list[list]:
    rows = []
    for n in levels:
        a, b = ours[n], theirs[n]
        rows.append([n, a["ttft50"], b["ttft50"], ratio(a["ttft50"], b["ttft50"]),
                     a["ttft95"], b["ttft95"], ratio(a["ttft95"], b["ttft95"]),
                     a["e2e50"], b["e2e50"], ratio(a["e2e50"], b["e2e50"]),
                     a["e2e95"], b["e2e95"], ratio(a["e2e95"], b["e2e95"]),
                     a["tps"], b["tps"], ratio(a["tps"], b["tps"]),
                     a["queue50"], a["queue95"], a["server_ttft50"], a["cpu_share"]])
    return rows


LEVEL_HEADERS = ["clients", "TTFT p50 ours", "TTFT p50 mlx_lm", "ratio",
                 "TTFT p95 ours", "TTFT p95 mlx_lm", "ratio",
                 "e2e p50 ours", "e2e p50 mlx_lm", "ratio",
                 "e2e p95 ours", "e2e p95 mlx_lm", "ratio",
                 "tok/s ours", "tok/s mlx_lm", "ratio",
                 "submit-to-admitted p50 ours", "p95", "server-side TTFT p50 ours",
                 "server + client CPU ours (cores)"]


def median_run(runs: list[dict]) -> dict:
    """Each figure's median over the rounds (None where a figure is missing)."""
    return {key: (p50([run[key] for run in runs]) if runs[0][key] is not None else None)
            for key in runs[0]}


def in_process_summary(local: list[dict]) -> dict:
    e2e = [r["e2e_ms"] for r in local]
    tokens = sum(r["tokens"] for r in local)
    return {"ttft50": p50([r["ttft_ms"] for r in local]),
            "ttft95": pct([r["ttft_ms"] for r in local], 95), "e2e50": p50(e2e),
            "e2e95": pct(e2e, 95), "tps": tokens / (sum(e2e) / 1000), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--models", default="demo,llama100m",
                        help="which of demo, llama100m (comma-separated)")
    parser.add_argument("--demo-requests", type=int, default=16, help="per level")
    parser.add_argument("--demo-max-tokens", type=int, default=48)
    parser.add_argument("--llama-requests", type=int, default=8, help="per level")
    parser.add_argument("--llama-max-tokens", type=int, default=32)
    parser.add_argument("--status-polls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of in-process, ours and mlx_lm.server; medians reported")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    wanted = args.models.split(",")
    if unknown := set(wanted) - {"demo", "llama100m"}:
        sys.exit(f"unknown model(s) {', '.join(sorted(unknown))}: use demo, llama100m")
    if not Path(OPENBLAS).exists():
        sys.exit(f"{OPENBLAS} is missing: apt-get install libopenblas0-pthread")
    began = time.perf_counter()

    scratch = Path(tempfile.mkdtemp(prefix="mlx-bench-serving-"))
    models: list[BenchModel] = []
    if "demo" in wanted:
        models.append(BenchModel("demo", "demo (bundled, 1.1M parameters)", DEMO_MODEL_PATH,
                                 args.demo_requests, args.demo_max_tokens))
    if "llama100m" in wanted:
        # Inside the server's root: registered folders must lie under it.
        path = scratch / "server" / "notebooks" / "llama-100m"
        params = build_random_llama(path, *LLAMA_100M)
        models.append(BenchModel("llama-100m", f"random-weight Llama, {params / 1e6:.0f}M "
                                 "parameters, fp32", path, args.llama_requests,
                                 args.llama_max_tokens))
    local_runs: dict[str, list[dict]] = {m.name: [] for m in models}
    beside_runs: dict[str, list[dict]] = {m.name: [] for m in models}  # with a CPU neighbour
    ours_runs: dict[str, list[dict[int, dict]]] = {m.name: [] for m in models}
    theirs_runs: dict[str, list[dict[int, dict]]] = {m.name: [] for m in models}
    status = None
    server = None
    mlx_servers: dict[str, tuple[subprocess.Popen, str]] = {}
    blas: dict[str, dict[str, str | None]] = {}  # our worker's, per model: the baselines' too
    try:
        server = start_server(scratch / "server", scratch / "jupyter.log")
        headers = {"Authorization": f"token {server.token}"}
        for model in models:
            if model.name != "demo":
                httpx.post(server.url + "mlx/api/models", headers=headers, timeout=60,
                           json={"name": model.name, "path": str(model.path)}
                           ).raise_for_status()
            blas[model.name] = worker_blas(server.url, headers, model.name)
            print(json.dumps({"model": model.name, "worker_blas": blas[model.name]}), flush=True)
            mlx_servers[model.name] = start_mlx_lm_server(
                model.path, scratch / f"mlx_lm_server-{model.name}.log", blas[model.name])
        # Rounds interleave the three, so that a busy spell on this shared machine hits all
        # of them alike; each figure is the median over the rounds.
        for round_number in range(args.rounds):
            for model in models:
                # The prompts ours and mlx_lm.server get at their first level.
                prompts = unique_prompts(level_tag(round_number, levels[0]), model.requests)
                local_runs[model.name].append(in_process_summary(
                    in_process(model, blas[model.name], prompts)))
                print(json.dumps({"round": round_number, "in_process": model.name,
                                  **local_runs[model.name][-1]}), flush=True)
                ours_runs[model.name].append(asyncio.run(bench_server(
                    ours_one, server.url, headers, levels, model, round_number,
                    server_and_client_cpu(server.process.pid))))
                theirs_runs[model.name].append(asyncio.run(bench_server(
                    mlx_lm_one, mlx_servers[model.name][1], {}, levels, model, round_number)))
                if 1 in levels:
                    share = ours_runs[model.name][-1][1]["cpu_share"]
                    beside_runs[model.name].append({**in_process_summary(
                        in_process(model, blas[model.name], prompts, share)), "share": share})
                    print(json.dumps({"round": round_number, "in_process_beside": model.name,
                                      **beside_runs[model.name][-1]}), flush=True)
        if "demo" in wanted:
            status = status_latency(server.url, headers, args.status_polls)
    finally:
        if server is not None:
            stopped_with_children(server.process.pid, lambda: stop_server(server))
        for process, _ in mlx_servers.values():
            stopped_with_children(process.pid, lambda: stop_process(process))
        shutil.rmtree(scratch, ignore_errors=True)
    local = {name: median_run(runs) for name, runs in local_runs.items()}
    beside = {name: median_run(runs) for name, runs in beside_runs.items() if runs}
    ours = {name: {n: median_run([run[n] for run in runs]) for n in levels}
            for name, runs in ours_runs.items()}
    theirs = {name: {n: median_run([run[n] for run in runs]) for n in levels}
              for name, runs in theirs_runs.items()}

    body = "All times in ms; tok/s = output tokens per second; ratio = ours / other.\n\n"
    body += "What each side gets (the baselines get our worker's BLAS environment):\n\n" + table(
        ["model", "LD_PRELOAD", "OPENBLAS_NUM_THREADS", "prompt cache"],
        [[model.name, blas[model.name]["LD_PRELOAD"] or "(none)",
          blas[model.name]["OPENBLAS_NUM_THREADS"] or "(library default)",
          "ours and mlx_lm.server: on; in-process: none; every prompt new to all three"]
         for model in models]) + "\n\n"
    targets = []
    for model in models:
        mine, other, limit = ours[model.name], theirs[model.name], local[model.name]
        body += (f"## {model.label}\n\n{model.requests} requests per level, max_tokens "
                 f"{model.max_tokens}. Ours vs mlx_lm.server:\n\n")
        body += table(LEVEL_HEADERS, level_rows(mine, other, levels))
        body += "\n\nOutput tokens per level: " + ", ".join(
            f"{n} clients ours {mine[n]['tokens']} / mlx_lm.server {other[n]['tokens']}"
            for n in levels) + ". Prompt tokens ours took from its prompt cache: " + ", ".join(
            f"{mine[n]['cached_tokens']:.0f} of {mine[n]['prompt_tokens']:.0f}"
            for n in levels) + " (the chat template's opening, shared by every prompt)."
        body += ("\n\nIn-process limit, `mlx_lm.stream_generate`, one request at a time:\n\n"
                 + table(["requests", "TTFT p50", "TTFT p95", "e2e p50", "e2e p95", "tok/s",
                          "output tokens"],
                         [[model.requests, limit["ttft50"], limit["ttft95"], limit["e2e50"],
                           limit["e2e95"], limit["tps"], limit["tokens"]]]) + "\n\n")
        rounds_ours, rounds_theirs = ours_runs[model.name], theirs_runs[model.name]
        if 1 in mine:
            share = mine[1]["tps"] / limit["tps"]
            each = ", ".join(f"{ours[1]['tps'] / alone['tps']:.0%}" for ours, alone
                             in zip(rounds_ours, local_runs[model.name]))
            targets.append([f"one stream vs in-process ({model.name})", ">= 95%",
                            f"{share:.0%} ({mine[1]['tps']:.0f} / {limit['tps']:.0f} tok/s; "
                            f"rounds {each})", "met" if share >= 0.95 else "missed"])
        if model.name in beside:
            near = beside[model.name]
            body += (f"The same in-process run beside a process that keeps "
                     f"{near['share']:.0%} of a core busy, the CPU our server and the client "
                     f"used at 1 client (their work left out): {near['tps']:.0f} tok/s, "
                     f"{near['tps'] / limit['tps']:.0%} of the limit alone; ours at 1 client is "
                     f"{mine[1]['tps'] / near['tps']:.0%} of it.\n\n")
        if 8 in mine:
            times = mine[8]["tps"] / other[8]["tps"]
            each = ", ".join(f"{ours[8]['tps'] / theirs[8]['tps']:.2f}x" for ours, theirs
                             in zip(rounds_ours, rounds_theirs))
            targets.append([f"8 streams vs mlx_lm.server ({model.name})", ">= 1.3x",
                            f"{times:.2f}x ({mine[8]['tps']:.0f} / {other[8]['tps']:.0f} "
                            f"tok/s; rounds {each})", "met" if times >= 1.3 else "missed"])
        admitted = [mine[n]["queue50"] for n in levels]
        targets.append([f"submit-to-admitted p50 ({model.name}), worst level", "< 5 ms",
                        f"{max(admitted):.3f} ms", "met" if max(admitted) < 5 else "missed"])

    if status is not None:
        idle, busy = status["idle"], status["busy"]
        body += "## `GET mlx/api/status` latency (ms)\n\n" + table(
            ["state", "samples", "p50", "p99", "max"],
            [["idle", len(idle), p50(idle), pct(idle, 99), max(idle)],
             ["4 demo streams generating", len(busy), p50(busy), pct(busy, 99), max(busy)]])
        targets.append(["GET status p99 under 4 streams", "< 10 ms",
                        f"{pct(busy, 99):.1f} ms", "met" if pct(busy, 99) < 10 else "missed"])
        body += "\n\n"

    body = ("## Targets\n\n" + table(["what", "target", "measured", ""], targets) + "\n\n"
            + body)
    body += f"""## How each figure is measured

- {args.rounds} rounds, each running the in-process limit, our server and mlx_lm.server one
  after the other on each model (all servers started once, before the first round); every
  figure in the tables is the median over the rounds, and ratios are ratios of medians.
- Prompts: each request's is new, an 8-hex-digit number (from the round, the level and the
  request) then one of {len(TEXTS)} texts in turn; every side gets the same prompts for the same
  round and level (the in-process run those of the first level), temperature 0; a closed loop
  of N clients, each sending its next request when its last one ends; 2 warm-up requests per
  server, model and round not counted.
- TTFT and e2e are client-side: from sending the POST to the first non-empty text piece, and to
  the end of the stream (our NDJSON `done` line; mlx_lm.server's `data: [DONE]`). p50 is the
  median, p95/p99 nearest-rank.
- tok/s for the servers: all output tokens of a level (our `usage.completion_tokens`;
  mlx_lm.server's streamed `usage`, `stream_options.include_usage`) divided by the level's wall
  time. In-process: all tokens over the sum of the one-at-a-time generation times (a model
  loaded in that process, no HTTP, chat template applied beforehand; one warm-up call not
  counted). "One stream vs in-process" divides ours at 1 client by that.
- submit-to-admitted (ours): the server's `timings.queue_ms`, from `InferenceQueue.submit` to
  admission into the model's batch. Every level here has free capacity (max_batch_size 8).
- server + client CPU (ours): see "CPU neighbour" below; the model worker is not counted.
- server-side TTFT (ours): `timings.ttft_ms`, submission to the first text; the client's TTFT
  minus it is HTTP, Jupyter's authentication and request parsing.
- Output lengths may differ between the servers (greedy decoding, but different batching
  numerics and stop handling), which the tok/s figures account for and e2e does not. The random
  Llama never stops early, so all its requests run to max_tokens.
- Status latency: sequential GETs from a client in this process, {args.status_polls} while idle,
  then {args.status_polls} (10 ms apart) while another process keeps 4 demo streams of up to 512
  tokens (temperature 1, seeded) running on the same server.
- CPU neighbour: the CPU seconds of the Jupyter server's own process (not its model workers)
  and of this client process during our 1-client level, per second of it, then burnt by a
  busy-loop process (busy that share of every millisecond) beside a second in-process run. It
  shows how much of the one-stream gap is the two processes' CPU rather than their latency.
- BLAS: our server runs with its defaults; the BLAS variables of its worker for each model
  (LD_PRELOAD from `preload_openblas`, OPENBLAS_NUM_THREADS from `blas_threads`: one thread for
  the demo, the library's default for the larger model) are read from the worker's
  /proc/PID/environ and given to the in-process run and to mlx_lm.server. The clients run on
  the same 2-core machine and compete with the servers for CPU.
- Small samples on 2 shared cores: repeated runs differ by tens of percent (tok/s, p50s) and
  p95s/p99s are set by one or two requests; read the ratios as rough.
- Total benchmark wall time: {time.perf_counter() - began:.0f} s.
"""
    save("serving", "Serving under concurrency: ours vs mlx_lm.server vs in-process", body,
         ("HF_HUB_OFFLINE=1 python benchmarks/bench_serving.py "
          + " ".join(sys.argv[1:])).rstrip())


if __name__ == "__main__":
    main()
