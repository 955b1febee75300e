"""Constrained decoding (a JSON schema, llguidance) vs free decoding in a model worker.

One run, side by side, on a random-weight Llama of about 100M parameters (hidden 768, 12 layers,
fp32: 117M with its embedding) with a byte-level BPE tokenizer of a realistic vocabulary
(32,000 pieces by default, trained here in ~10 s on Python's own documentation and standard
library sources; 8,192 or fewer come from tests/model_factory.train_tokenizer), and on a
random model of the bundled demo's shape (1.1M parameters, the demo's 2,048-piece tokenizer),
where a decode step is short and the mask weighs most. Both are driven through the real
engine (WorkerProxy -> worker process, as the server runs it: OpenBLAS, its prompt cache,
batches of up to 8), so that no HTTP is measured:

1. decode tokens per second, greedy (temperature 0), the same max_tokens for all, in rounds
   whose order alternates: one request alone, free and constrained; batches of 8, all free
   and half constrained (`--layouts` adds all constrained). Random weights never end an answer
   early, and the schema (a title of up to 200 characters, then 40 to 60 notes) holds more
   than max_tokens tokens, so every run makes exactly max_tokens tokens (the table lists them,
   and each constrained answer is checked to start as the schema says). Every prompt is new
   to the worker's prompt cache (a hashed number first).
2. grammar compile time: in this process with the worker's own classes and tokenizer
   (`GrammarCompiler.compile(...).result()`; cold: a schema never seen, its first field
   renamed; cached: the same schema again), and in the worker, as the time to the first token
   of a constrained request minus that of a free one with the same short prompt (and that
   time less the worker's own prefill time: the wait to be admitted).
3. what a constrained row costs a decode step: each part of GrammarProcessor.__call__ timed on
   its own over a walk through the schema, with the alternatives a faster processor could use
   (in this process); and mlx-lm's BatchGenerator stepping the model with no processor, a
   no-op one, one that only reads the token before (the grammar's wait), GrammarProcessor,
   and GrammarProcessor that queues the forward pass first (in a process with the worker's
   environment).

Timings are printed and saved (benchmarks/results/structured.md), never asserted.

    .venv/bin/python benchmarks/bench_structured.py [--max-tokens 64] [--rounds 3] \\
        [--vocab 32000] [--hidden 768] [--layers 12] [--demo-rounds 5] [--profile-rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import OPENBLAS, median, save, table  # noqa: E402
from model_factory import (  # noqa: E402
    backdate,
    llama_config,
    llama_tensors,
    make_model,
    train_tokenizer,
)

from mlx_jupyter.engine.protocol import PARAM_DEFAULTS  # noqa: E402
from mlx_jupyter.engine.proxy import WorkerProxy, worker_environment  # noqa: E402
from mlx_jupyter.models.manager import WorkerSettings  # noqa: E402
from mlx_jupyter.models.memory import MemoryEstimator  # noqa: E402

TEXT = ("Write the record of this meeting as JSON: a title, then the notes, one short line for "
        "each point that was raised, in the order they came up.")
SHORT = "JSON:"  # the time-to-first-token prompt: its prefill is a few tokens
BATCH = 8
DEMO_LABEL = "1.1M (demo's shape), 2k vocab"


def schema(title: str = "title") -> dict:
    """An object with a title of up to 200 characters and at least 40 notes: more than any
    max_tokens here, whatever a random model picks inside it."""
    return {"type": "object",
            "properties": {title: {"type": "string", "maxLength": 200},
                           "notes": {"type": "array", "minItems": 40, "maxItems": 60,
                                     "items": {"type": "string", "maxLength": 200}}},
            "required": [title, "notes"], "additionalProperties": False}


def json_constraint(title: str = "title") -> dict:
    return {"kind": "json", "schema": schema(title)}


# -- the model ------------------------------------------------------------------------------

def large_corpus() -> list[str]:
    """Python's documentation and standard library sources (~5 MB): enough text for 32,000
    pieces (the documentation alone tops out at ~9,200)."""
    import pydoc_data.topics
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(pydoc_data.topics.topics.values()) + [
        path.read_text(errors="ignore") for path in sorted(stdlib.glob("*.py"))]


def build_model(folder: Path, hidden: int, layers: int, vocab_size: int) -> tuple[int, int]:
    """A random-weight fp32 Llama (model_factory's shapes) whose embedding (tied to its output
    layer) fits a tokenizer of vocab_size pieces; (parameters, the tokenizer's pieces)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    train_tokenizer(folder, vocab_size, None if vocab_size <= 8192 else large_corpus())
    pieces = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config = {**llama_config(hidden, layers), "vocab_size": pieces}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = llama_tensors(hidden, layers)
    rng = np.random.default_rng(1)
    tensors["model.embed_tokens.weight"] = (
        rng.standard_normal((pieces, hidden), dtype=np.float32) * 0.02)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    backdate(folder)  # the memory estimator's cache does not trust fresh files
    return sum(t.size for t in tensors.values()), pieces


# -- the worker -----------------------------------------------------------------------------

def params(prompt: str, max_tokens: int, constraint: dict | None) -> dict:
    return {**PARAM_DEFAULTS, "prompt": prompt, "messages": None, "max_tokens": max_tokens,
            "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": [],
            "constraint": constraint}


_serial = 0


def fresh_prompt(text: str = TEXT) -> str:
    """A prompt no earlier request of this run began with (a hashed serial number first)."""
    global _serial
    _serial += 1
    return f"{hashlib.sha256(str(_serial).encode()).hexdigest()[:8]}: {text}"


async def one(proxy: WorkerProxy, prompt: str, max_tokens: int, constraint: dict | None
              ) -> dict:
    """One request; what it made and how fast (decode speed from the worker's timings,
    time to first text from here)."""
    global _serial
    _serial += 1
    start = time.perf_counter()
    first = None
    text = []
    done: dict = {}
    async for message in proxy.generate(f"bench-{_serial}", params(prompt, max_tokens,
                                                                   constraint)):
        if "done" in message:
            done = message
        elif message.get("text"):
            text.append(message["text"])
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    usage, timings = done["usage"], done["timings"]
    # The worker's prefill time (admission to first token); what is left of the time to first
    # text is the wait to be admitted (the grammar: built on the MLX thread, then compiled).
    prefill_s = ((usage["prompt_tokens"] - usage["cached_tokens"])
                 / timings["prompt_tokens_per_second"]) if timings.get(
                     "prompt_tokens_per_second") else 0.0
    return {"constrained": constraint is not None, "text": "".join(text),
            "tokens": done["usage"]["completion_tokens"],
            "cached": done["usage"]["cached_tokens"], "finish": done["finish_reason"],
            "decode_tps": done["timings"].get("tokens_per_second", float("nan")),
            "ttft_ms": ((first or end) - start) * 1000, "e2e_s": end - start,
            "admit_ms": ((first or end) - start - prefill_s) * 1000}


async def batch(proxy: WorkerProxy, kinds: list[bool], max_tokens: int) -> dict:
    """len(kinds) requests at once (True: constrained by the cached schema), new prompts."""
    cpu = worker_cpu(proxy)
    start = time.perf_counter()
    rows = await asyncio.gather(*[one(proxy, fresh_prompt(), max_tokens,
                                      json_constraint() if constrained else None)
                                  for constrained in kinds])
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in rows)
    return {"rows": rows, "wall_s": wall, "sum_tps": sum(r["decode_tps"] for r in rows),
            "cpu_ms_per_token": (worker_cpu(proxy) - cpu) * 1000 / tokens}


async def alone(proxy: WorkerProxy, constrained: bool, max_tokens: int) -> dict:
    cpu = worker_cpu(proxy)
    row = await one(proxy, fresh_prompt(), max_tokens, json_constraint() if constrained else None)
    row["cpu_ms_per_token"] = (worker_cpu(proxy) - cpu) * 1000 / row["tokens"]
    return row


def worker_cpu(proxy: WorkerProxy) -> float:
    """CPU seconds the worker process has used (all its threads): less sensitive than wall
    time to what else runs on the machine."""
    times = psutil.Process(proxy.pid).cpu_times()
    return times.user + times.system


def check_answer(row: dict) -> None:
    """A constrained answer cut at max_tokens is the beginning of a valid one: it starts the
    object as the schema says (a whole one would be checked with jsonschema)."""
    if row["constrained"] and not row["text"].startswith('{"title'):
        raise RuntimeError(f"a constrained answer does not follow the schema: {row['text']!r}")


LAYOUTS = {"all free": [False] * BATCH,
           "half constrained": [i % 2 == 0 for i in range(BATCH)],
           "all constrained": [True] * BATCH}


async def measure_worker(path: Path, rounds: int, max_tokens: int, layouts: list[str],
                         ttft_repeats: int) -> dict:
    estimate = MemoryEstimator().estimate(path).estimate_bytes
    env = WorkerSettings(env=worker_environment(OPENBLAS)).environment(estimate)
    proxy = WorkerProxy(path.name, path, env=env)
    await proxy.start()
    out: dict = {"load_s": (proxy.load_ms or 0) / 1000, "alone": [], "batches": {},
                 "ttft": {"free": [], "cold": [], "cached": []}}
    try:
        # Warm-up (not counted): MLX's kernels, llguidance's view of the tokenizer, the
        # schema's grammar in the worker's cache, and the short prompt in the prompt cache.
        await one(proxy, fresh_prompt(), 8, None)
        await one(proxy, fresh_prompt(), 8, json_constraint())
        await one(proxy, SHORT, 3, None)

        # 2 (in the worker): time to first token, free / a schema never seen / seen before.
        for i in range(ttft_repeats):
            out["ttft"]["free"].append(await one(proxy, SHORT, 3, None))
            out["ttft"]["cold"].append(await one(proxy, SHORT, 3, json_constraint(f"title_{i}")))
            out["ttft"]["cached"].append(await one(proxy, SHORT, 3, json_constraint()))

        # 1: alone and in batches, in rounds whose order alternates.
        for round_number in range(rounds):
            flip = round_number % 2 == 1
            for constrained in ((True, False) if flip else (False, True)):
                row = await alone(proxy, constrained, max_tokens)
                check_answer(row)
                out["alone"].append(row)
            for name in (layouts[::-1] if flip else layouts):
                result = await batch(proxy, LAYOUTS[name], max_tokens)
                for row in result["rows"]:
                    check_answer(row)
                out["batches"].setdefault(name, []).append(result)
            free = [r for r in out["alone"] if not r["constrained"]][-1]
            constrained = [r for r in out["alone"] if r["constrained"]][-1]
            print(f"{path.name}, round {round_number + 1}: alone free "
                  f"{free['decode_tps']:.2f} tok/s, constrained "
                  f"{constrained['decode_tps']:.2f}; batch totals " + ", ".join(
                      f"{name} {out['batches'][name][-1]['sum_tps']:.1f}" for name in layouts),
                  flush=True)
    finally:
        await proxy.stop()
    return out


# -- in a process of its own: what a grammar costs a decode step, part by part -----------

# One row in mlx-lm's BatchGenerator (as the worker drives it) with three sets of logits
# processors, in interleaved rounds: none; one that only reads the token sampled at the step
# before (GrammarProcessor's wait for it) and changes nothing; GrammarProcessor itself. Run
# with the worker's environment (OpenBLAS, its thread count).
STEP_PROFILE = r"""
import json, sys, time
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_jupyter.engine.grammar.processor import GrammarCompiler, GrammarProcessor
from mlx_jupyter.engine.sampling import argmax_sampler
path, grammar, vocab, rounds, steps, rows, prompt = sys.argv[1:8]
vocab, rounds, steps, rows = int(vocab), int(rounds), int(steps), int(rows)
model, tokenizer = load(path)
eos = sorted(tokenizer.eos_token_ids)
compiler = GrammarCompiler(tokenizer._tokenizer, eos, vocab)
compiler.compile(grammar).result()

def no_op(tokens, logits):
    return logits

def sync_only(tokens, logits):
    int(tokens[-1].item())
    return logits

class QueuedFirst(GrammarProcessor):
    # First queues the forward pass whose logits it masks: the pass needs only the token
    # before, as the mask does, so the two can run at once.

    def __call__(self, tokens, logits):
        mx.async_eval(logits)
        return super().__call__(tokens, logits)

def processors(kind):
    if kind in ("grammar", "queued"):
        matcher = compiler.compile(grammar).result()
        return [(GrammarProcessor if kind == "grammar" else QueuedFirst)(matcher, vocab, eos)]
    return {"free": [], "no_op": [no_op], "sync": [sync_only]}[kind]

def run(kind):
    generator = BatchGenerator(model, sampler=argmax_sampler, completion_batch_size=rows,
                               prefill_batch_size=rows)
    # one row alone, or half of a batch constrained (the even rows)
    generator.insert([tokenizer.encode(f"{i}: {prompt}") for i in range(rows)],
                     max_tokens=[steps + 1] * rows,
                     logits_processors=[processors(kind) if i % 2 == 0 else []
                                        for i in range(rows)])
    stamps = []
    while True:
        responses = generator.next()
        if isinstance(responses, tuple):  # newer mlx-lm: (prompt progress, responses)
            responses = responses[1]
        if not responses:
            continue
        if len(responses) == rows:
            stamps.append(time.perf_counter())
        if any(r.finish_reason for r in responses):
            break
    generator.close()
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)

run("free")  # warm-up
kinds = ["free", "no_op", "sync", "grammar", "queued"]
results = {kind: [] for kind in kinds}
for r in range(rounds):
    for kind in (kinds if r % 2 == 0 else kinds[::-1]):
        results[kind].append(run(kind))
print(json.dumps(results))
"""


def profile_steps(path: Path, vocab: int, rounds: int, steps: int, rows: int) -> dict:
    from mlx_jupyter.engine.grammar.constraints import compiled_grammar
    from mlx_jupyter.engine.grammar.syntax import ToolSyntax

    estimate = MemoryEstimator().estimate(path).estimate_bytes
    env = WorkerSettings(env=worker_environment(OPENBLAS)).environment(estimate)
    grammar = compiled_grammar(json_constraint(), ToolSyntax())
    result = subprocess.run(
        [sys.executable, "-c", STEP_PROFILE, str(path), grammar, str(vocab), str(rounds),
         str(steps), str(rows), TEXT], env=env, check=True, capture_output=True, text=True)
    runs = json.loads(result.stdout.splitlines()[-1])
    return {kind: {"ms": median(rows), "rounds": rows} for kind, rows in runs.items()}


# -- in this process: compile and the mask -----------------------------------------------

def timed(fn, *a):
    start = time.perf_counter()
    value = fn(*a)
    return (time.perf_counter() - start) * 1000, value


def measure_compile(path: Path, repeats: int) -> dict:
    """GrammarCompiler as the worker builds it (its tokenizer, eos tokens, vocabulary)."""
    from mlx_lm.utils import load_tokenizer

    from mlx_jupyter.engine.grammar.constraints import compiled_grammar
    from mlx_jupyter.engine.grammar.processor import GrammarCompiler
    from mlx_jupyter.engine.grammar.syntax import ToolSyntax
    from mlx_jupyter.engine.worker import _vocab_size

    tokenizer = load_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    vocab = _vocab_size(config, tokenizer)
    compiler = GrammarCompiler(tokenizer._tokenizer, sorted(tokenizer.eos_token_ids), vocab)
    tokenizer_ms, _ = timed(compiler.tokenizer)
    to_grammar, cold, cached = [], [], []
    for i in range(repeats):
        ms, grammar = timed(compiled_grammar, json_constraint(f"name_{i}"), ToolSyntax())
        to_grammar.append(ms)
        cold.append(timed(lambda: compiler.compile(grammar).result())[0])
        cached.append(timed(lambda: compiler.compile(grammar).result())[0])
    return {"compiler": compiler, "tokenizer": tokenizer, "vocab": vocab,
            "tokenizer_ms": tokenizer_ms, "to_grammar_ms": median(to_grammar),
            "cold_ms": median(cold), "cached_ms": median(cached)}


def measure_mask(compiler, vocab: int, eos: list[int], steps: int) -> dict:
    """ms per step of each part of GrammarProcessor.__call__, over a walk of `steps` tokens
    through the schema (each the best allowed token of random logits, as a random model
    picks), and of the alternatives. Everything MLX is evaluated where it is timed."""
    import mlx.core as mx
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    from mlx_jupyter.engine.grammar.constraints import compiled_grammar
    from mlx_jupyter.engine.grammar.processor import GrammarProcessor
    from mlx_jupyter.engine.grammar.syntax import ToolSyntax

    grammar = compiled_grammar(json_constraint(), ToolSyntax())
    matcher = compiler.compile(grammar).result()
    mask = allocate_token_bitmask(1, vocab)
    shifts = mx.arange(32, dtype=mx.uint32)
    neg = mx.array(-float("inf"), mx.float32)
    mx.random.seed(0)
    parts: dict[str, list[float]] = {k: [] for k in (
        "consume", "fill", "unpack", "to_mx", "where",
        "alt_mx_unpack", "alt_bool_view", "alt_compare")}
    previous = None
    same = 0
    walk = []
    for step in range(steps):
        logits = mx.random.normal((1, vocab))
        mx.eval(logits)
        parts["fill"].append(timed(fill_next_token_bitmask, matcher, mask)[0])
        # what the processor does now
        start = time.perf_counter()
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        parts["unpack"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        allowed_mx = mx.array(allowed)[None]
        mx.eval(allowed_mx)
        parts["to_mx"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        masked = mx.where(allowed_mx, logits, neg)
        mx.eval(masked)
        parts["where"].append((time.perf_counter() - start) * 1000)
        # alternatives: unpack the 32-bit words in MLX (a vocab/8-byte copy, not vocab bytes)
        start = time.perf_counter()
        words = mx.array(mask.view(np.uint32))
        bits = ((words[..., None] >> shifts) & 1).reshape(1, -1)[:, :vocab].astype(mx.bool_)
        alt = mx.where(bits, logits, neg)
        mx.eval(alt)
        parts["alt_mx_unpack"].append((time.perf_counter() - start) * 1000)
        # ... or skip the astype copy: unpackbits' uint8 0/1 viewed as bool
        start = time.perf_counter()
        view = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].view(bool)
        parts["alt_bool_view"].append((time.perf_counter() - start) * 1000)
        # ... or keep the previous step's mx mask when the bitmask did not change
        start = time.perf_counter()
        unchanged = previous is not None and np.array_equal(previous, mask)
        parts["alt_compare"].append((time.perf_counter() - start) * 1000)
        same += unchanged
        previous = mask.copy()
        if not (np.array_equal(view, allowed) and mx.array_equal(alt, masked).item()):
            raise RuntimeError("an alternative mask differs from the processor's")
        # the token a random model picks: the best allowed one
        token_id = int(mx.argmax(masked, axis=-1).item())
        walk.append(token_id)
        parts["consume"].append(timed(matcher.consume_token, token_id)[0])
        if matcher.is_error() or matcher.is_stopped():
            raise RuntimeError(f"the walk stopped after {step + 1} tokens")
    # The whole processor as the worker calls it, over the same walk.
    processor = GrammarProcessor(compiler.compile(grammar).result(), vocab, eos)
    tokens = mx.array([0] + walk)
    logits = mx.random.normal((1, vocab))
    mx.eval(tokens, logits)
    whole = []
    for step in range(len(walk)):
        context = tokens[:step + 1]
        start = time.perf_counter()
        mx.eval(processor(context, logits))
        whole.append((time.perf_counter() - start) * 1000)
    result = {k: statistics.median(v) for k, v in parts.items()}
    result["whole"] = statistics.median(whole)
    result.update(measure_rows(compiler, grammar, vocab, eos, walk))
    result["unchanged"] = same / max(1, steps - 1)
    text = compiler.tokenizer().decode_bytes(walk).decode(errors="replace")
    result["walk"] = text[:80]
    return result


def measure_rows(compiler, grammar: str, vocab: int, eos: list[int], walk: list[int],
                 rows: int = BATCH // 2) -> dict:
    """ms per step for `rows` constrained rows of a batch: one GrammarProcessor per row and
    the rows' logits concatenated (what mlx-lm's BatchGenerator does with per-row processors),
    against one batch-wide mask: the matchers advanced and their masks filled by llguidance's
    parallel calls (consume_token_par, fill_next_token_bitmask_par, GIL released), one
    unpackbits, one numpy to MLX copy and one mx.where over [rows, vocab]."""
    import mlx.core as mx
    from llguidance.numpy import (
        LLExecutor,
        allocate_token_bitmask,
        consume_token_par,
        fill_next_token_bitmask_par,
    )

    from mlx_jupyter.engine.grammar.processor import GrammarProcessor

    processors = [GrammarProcessor(compiler.compile(grammar).result(), vocab, eos)
                  for _ in range(rows)]
    matchers = [compiler.compile(grammar).result() for _ in range(rows)]
    executor = LLExecutor()
    bitmask = allocate_token_bitmask(rows, vocab)
    neg = mx.array(-float("inf"), mx.float32)
    tokens = mx.array([0] + walk)
    logits = mx.random.normal((rows, vocab))
    mx.eval(tokens, logits)
    per_row, batched = [], []
    for step in range(len(walk)):
        context = tokens[:step + 1]
        start = time.perf_counter()
        mx.eval(mx.concatenate([p(context, logits[i:i + 1]) for i, p in enumerate(processors)]))
        per_row.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        if step:
            consume_token_par(executor, [(m, walk[step - 1]) for m in matchers])
        fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        allowed = np.unpackbits(bitmask.view(np.uint8), axis=-1,
                                bitorder="little")[:, :vocab].view(bool)
        mx.eval(mx.where(mx.array(allowed), logits, neg))
        batched.append((time.perf_counter() - start) * 1000)
    return {"rows_per_row": statistics.median(per_row),
            "rows_batched": statistics.median(batched)}


# -- the report -----------------------------------------------------------------------------

def span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def rounds_text(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def decode_rows(label: str, out: dict) -> tuple[list[list], dict]:
    """The decode table's rows of one model, and its ratios (median, and each round's)."""
    alone_free = [r for r in out["alone"] if not r["constrained"]]
    alone_json = [r for r in out["alone"] if r["constrained"]]
    free_tps = median([r["decode_tps"] for r in alone_free])
    json_tps = median([r["decode_tps"] for r in alone_json])
    ratios = {"alone": (json_tps / free_tps, [c["decode_tps"] / f["decode_tps"]
                                              for f, c in zip(alone_free, alone_json)])}
    rows = []
    for kind, group, tps in (("free", alone_free, free_tps),
                             ("JSON schema", alone_json, json_tps)):
        rows.append([label, "alone", kind, span([r["tokens"] for r in group]),
                     ", ".join(sorted({r["finish"] for r in group})), tps, tps,
                     f"{tps / free_tps:.2f}",
                     median([r["cpu_ms_per_token"] for r in group])])
    base = out["batches"].get("all free")
    for name, results in out["batches"].items():
        total = median([b["sum_tps"] for b in results])
        ratio = total / median([b["sum_tps"] for b in base]) if base else float("nan")
        if base and name != "all free":
            ratios[name] = (ratio, [b["sum_tps"] / f["sum_tps"] for b, f in zip(results, base)])
        cpu = median([b["cpu_ms_per_token"] for b in results])
        for constrained in (False, True):
            group = [r for b in results for r in b["rows"] if r["constrained"] == constrained]
            if not group:
                continue
            count = sum(1 for r in results[0]["rows"] if r["constrained"] == constrained)
            rows.append([label, f"batch of {BATCH}, {name}",
                         f"{'JSON schema' if constrained else 'free'} ({count})",
                         span([r["tokens"] for r in group]),
                         ", ".join(sorted({r["finish"] for r in group})),
                         median([r["decode_tps"] for r in group]), total, f"{ratio:.2f}", cpu])
    return rows, ratios


def ratio_text(label: str, ratios: dict) -> str:
    return f"{label}: " + "; ".join(
        f"{'constrained alone / free alone' if name == 'alone' else name + ' batch / all free'}"
        f" **{value:.2f}×** (rounds: {rounds_text(each)})"
        for name, (value, each) in ratios.items())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--layouts", default="all free,half constrained",
                        help="batches of 8 to run, of: " + ", ".join(LAYOUTS))
    parser.add_argument("--demo-rounds", type=int, default=5,
                        help="rounds on a random model of the demo's shape too (0: none)")
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--compile-repeats", type=int, default=10)
    parser.add_argument("--mask-steps", type=int, default=200)
    parser.add_argument("--profile-rounds", type=int, default=3,
                        help="rounds of the per-step profile in BatchGenerator (0: skip it)")
    parser.add_argument("--profile-tokens", type=int, default=16)
    args = parser.parse_args()
    if not Path(OPENBLAS).exists():
        sys.exit(f"{OPENBLAS} is missing: apt-get install libopenblas0-pthread")
    layouts = [name.strip() for name in args.layouts.split(",")]
    if set(layouts) - set(LAYOUTS):
        sys.exit(f"unknown layouts: {', '.join(sorted(set(layouts) - set(LAYOUTS)))}")

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    scratch = Path(tempfile.mkdtemp(prefix="mlx-bench-structured-"))
    try:
        path = scratch / f"llama-{args.hidden}x{args.layers}"
        parameters, pieces = build_model(path, args.hidden, args.layers, args.vocab)
        print(f"random Llama {parameters / 1e6:.0f}M fp32, a tokenizer of {pieces} pieces "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        # The other end of the scale: a random model of the bundled demo's shape (hidden 128,
        # 4 layers, 1.1M parameters) and tokenizer (2,048 pieces); random, so that it never
        # ends an answer early (the trained demo ends most at once on these prompts).
        small = make_model(scratch / "demo-shape", hidden=128, layers=4).path
        compiled, masks = {}, {}
        for key, folder in (("main", path), ("demo", small)):
            if key == "demo" and not args.demo_rounds:
                continue
            compiled[key] = measure_compile(folder, args.compile_repeats)
            masks[key] = measure_mask(compiled[key]["compiler"], compiled[key]["vocab"],
                                      sorted(compiled[key]["tokenizer"].eos_token_ids),
                                      args.mask_steps)
            compiled[key]["compiler"].close()
            print(key, json.dumps({k: v for k, v in {**compiled[key], **masks[key]}.items()
                                   if isinstance(v, (int, float, str))}), flush=True)
        out = await measure_worker(path, args.rounds, args.max_tokens, layouts,
                                   args.ttft_repeats)
        demo = (await measure_worker(small, args.demo_rounds, args.max_tokens,
                                     layouts, 0) if args.demo_rounds else None)
        # The per-step profile: each model alone and in a batch of 8 with half its rows
        # constrained (the small model's steps are short: more of them).
        steps = {}
        if args.profile_rounds:
            for key, folder, tokens in (("main", path, args.profile_tokens),
                                        ("demo", small, args.profile_tokens * 4)):
                if key == "demo" and not args.demo_rounds:
                    continue
                for rows in (1, BATCH):
                    steps[key, rows] = profile_steps(folder, compiled[key]["vocab"],
                                                     args.profile_rounds, tokens, rows)
                    print(key, rows, json.dumps(steps[key, rows]), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()[0]
    runs = [out] + ([demo] if demo else [])
    cached_max = max(r["cached"] for run in runs for r in run["alone"] + [
        r for results in run["batches"].values() for b in results for r in b["rows"]])

    label = f"{parameters / 1e6:.0f}M, {pieces // 1000}k vocab"
    rows, ratios = decode_rows(label, out)
    texts = [ratio_text(label, ratios)]
    if demo:
        demo_rows, demo_ratios = decode_rows(DEMO_LABEL, demo)
        rows += demo_rows
        texts.append(ratio_text(DEMO_LABEL, demo_ratios) + f" ({args.demo_rounds} rounds)")
    body = (f"**{label}**: a random-weight Llama of {parameters / 1e6:.0f}M parameters, fp32 "
            f"(hidden {args.hidden}, {args.layers} layers), with a byte-level BPE tokenizer of "
            f"{pieces:,} pieces; **{DEMO_LABEL}**: a random-weight model of the bundled demo's "
            "shape (hidden 128, 4 layers) with its tokenizer (2,048 pieces), for the other end "
            "of the scale. Driven through WorkerProxy (no HTTP), "
            f"OpenBLAS, greedy, {args.max_tokens} new tokens per answer. The schema: an object "
            "with a `title` string (maxLength 200) and 40 to 60 `notes` strings (maxLength 200 "
            "each), more than any answer here can finish.\n\n### Decode speed\n\n")
    body += table(["model", "run", "rows", "completion tokens", "finish",
                   "decode tok/s per row", "total tok/s", "vs free", "worker CPU ms per token"],
                  rows)
    body += (f"\n\nMedians of {args.rounds} rounds (their order alternating). Decode tok/s is "
             "the worker's (tokens after the first over the time after it); a batch's total is "
             "the sum of its rows' (they decode together); \"vs free\" is against the free run "
             "alone, or the all-free batch. Worker CPU: the worker process's CPU time (all "
             "threads, prefill included) per completion token. " + ". ".join(texts)
             + f". Target: ≥ 0.8×. Every prompt was new to the prompt cache (at most "
             f"{cached_max} cached tokens).")

    main_compile = compiled["main"]
    ttft = {kind: median([r["ttft_ms"] for r in rows]) for kind, rows in out["ttft"].items()}
    admit = {kind: median([r["admit_ms"] for r in rows]) for kind, rows in out["ttft"].items()}
    body += f"\n\n### Grammar compile ({label})\n\n" + table(
        ["", "in process (ms)", "worker: TTFT − free TTFT (ms)",
         "worker: wait to be admitted − free's (ms)"],
        [["llguidance's tokenizer, first use (once per worker)", main_compile["tokenizer_ms"],
          "", ""],
         ["schema to grammar (each request, on the worker's MLX thread)",
          main_compile["to_grammar_ms"], "", ""],
         ["compile, a schema never seen", main_compile["cold_ms"],
          ttft["cold"] - ttft["free"], admit["cold"] - admit["free"]],
         ["compile, the same schema again (a cached matcher's deep copy)",
          main_compile["cached_ms"], ttft["cached"] - ttft["free"],
          admit["cached"] - admit["free"]]])
    body += (f"\n\nIn process: `GrammarCompiler.compile(grammar).result()` with the worker's "
             f"tokenizer, median of {args.compile_repeats} (cold: the first field renamed each "
             f"time). In the worker: the prompt `{SHORT}` (in the prompt cache), 3 tokens, "
             f"medians of {args.ttft_repeats}: TTFT free {ttft['free']:.1f} ms, cold "
             f"{ttft['cold']:.1f}, cached {ttft['cached']:.1f} (a decode step's noise is larger "
             "than the compile); the wait to be admitted is the TTFT less the worker's own "
             f"prefill time: free {admit['free']:.1f} ms, cold {admit['cold']:.1f}, cached "
             f"{admit['cached']:.1f}.")

    def step_ms(run: dict, constrained: bool) -> float:
        return 1000 / median([r["decode_tps"] for r in run["alone"]
                              if r["constrained"] == constrained])

    keys = list(masks)
    names = {"main": label, "demo": DEMO_LABEL}
    runs_by_key = {"main": out, "demo": demo}
    parts = [("llguidance `fill_next_token_bitmask`", "fill"),
             ("`np.unpackbits` + `astype(bool)` (vocab bytes)", "unpack"),
             ("`mx.array(allowed)`: the full-vocabulary numpy to MLX copy", "to_mx"),
             ("`mx.where(allowed, logits, -inf)`", "where"),
             ("`matcher.consume_token`", "consume"),
             ("the whole `__call__` (all of the above, evaluated)", "whole"),
             ("alternative: unpack the bitmask's 32-bit words in MLX, then `where`",
              "alt_mx_unpack"),
             ("alternative: `unpackbits(...).view(bool)` (no astype copy)", "alt_bool_view"),
             ("alternative: compare with the previous bitmask (to reuse its MLX mask)",
              "alt_compare"),
             (f"{BATCH // 2} constrained rows: a GrammarProcessor each, logits concatenated",
              "rows_per_row"),
             (f"{BATCH // 2} constrained rows, alternative: one batch-wide mask "
              "(llguidance `*_par`, one copy, one `where`)", "rows_batched")]
    mask_rows = [[text] + [masks[k][part] for k in keys] for text, part in parts]
    mask_rows.append(["for scale: a decode step alone in the worker, free"]
                     + [step_ms(runs_by_key[k], False) for k in keys])
    mask_rows.append(["for scale: a decode step alone in the worker, constrained"]
                     + [step_ms(runs_by_key[k], True) for k in keys])
    body += "\n\n### What the mask costs one constrained row, per decode step\n\n" + table(
        ["part of GrammarProcessor.__call__"] + [f"ms, {names[k]}" for k in keys], mask_rows)
    body += (f"\n\nIn this process: medians over a {args.mask_steps}-token walk through the "
             "schema (each step the best allowed token of random logits, as a random model "
             "picks), each part evaluated where it is timed. The bitmask was the same as the "
             "step before's in " + ", ".join(f"{masks[k]['unchanged']:.0%} ({names[k]})"
                                             for k in keys) + " of steps.")
    if steps:
        columns = list(steps)
        profile_rows = []
        for kind, text in (("free", "none"),
                           ("no_op", "a no-op (mlx-lm's per-row path: slices, concatenate)"),
                           ("sync", "one that only reads the token before (`.item()`)"),
                           ("grammar", "GrammarProcessor"),
                           ("queued", "GrammarProcessor, the forward pass queued first "
                                      "(`mx.async_eval(logits)`)")):
            cells = [text]
            for column in columns:
                value, free = steps[column][kind]["ms"], steps[column]["free"]["ms"]
                cells.append(f"{value:.2f}" if kind == "free"
                             else f"{value:.2f} ({value - free:+.2f})")
            profile_rows.append(cells)
        headers = ["logits processor on the constrained rows"] + [
            f"{names[key]}, {'alone' if rows == 1 else f'batch of {rows}, half'}"
            for key, rows in columns]
        body += ("\n\n### Per decode step in mlx-lm's BatchGenerator (ms)\n\n"
                 + table(headers, profile_rows))
        body += (f"\n\nEach model in a process of its own with the worker's environment; one "
                 f"row alone, or {BATCH} rows with a processor on every other one; "
                 f"{args.profile_tokens} steps ({args.profile_tokens * 4} for the small model), "
                 f"medians of {args.profile_rounds} rounds (order alternating); in brackets, "
                 "the difference from none. Reading the token before makes the step wait for "
                 "the one before where the first processor runs (after the next forward pass's "
                 "graph is built, before it is queued): the masks of all constrained rows are "
                 "then computed one after the other while nothing else runs.")
    body += (f"\n\nThe machine's load average (1 min) was {load_before:.1f} at the start and "
             f"{load_after:.1f} at the end (2 cores, shared with other work: compare figures "
             f"within a run); the run took {time.perf_counter() - started:.0f} s.")
    save("structured", "Constrained (JSON schema) vs free decoding in a model worker", body,
         shlex.join(["python", "benchmarks/bench_structured.py", *sys.argv[1:]]))


if __name__ == "__main__":
    asyncio.run(main())
