"""Helpers shared by the benchmarks: tables that are printed and saved, random test models."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"

# A Llama of the demo's shape family with random weights and the demo's tokenizer. Random
# weights rarely produce the end-of-sequence token, so generations run to max_tokens.
BUILD_RANDOM_LLAMA = r"""
import json, shutil, sys
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
demo, out, hidden, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
config = json.loads((demo / "config.json").read_text())
config.update(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=hidden * 8 // 3,
              num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
              max_position_embeddings=4096)
mx.random.seed(0)
model = llama.Model(llama.ModelArgs.from_dict(config))
out.mkdir(parents=True, exist_ok=True)
mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
(out / "config.json").write_text(json.dumps(config))
for f in demo.iterdir():
    if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
        shutil.copy(f, out / f.name)
print(sum(v.size for _, v in tree_flatten(model.parameters())))
"""


def build_random_llama(folder: Path, hidden: int, layers: int) -> int:
    """Writes a random-weight Llama (fp32) into folder; returns its parameter count."""
    from mlx_jupyter.engine.proxy import worker_environment
    from mlx_jupyter.models.registry import DEMO_MODEL_PATH

    result = subprocess.run(
        [sys.executable, "-c", BUILD_RANDOM_LLAMA, str(DEMO_MODEL_PATH), str(folder),
         str(hidden), str(layers)],
        env=worker_environment(OPENBLAS if Path(OPENBLAS).exists() else None),
        check=True, capture_output=True, text=True)
    return int(result.stdout.split()[-1])


def stop_process(process: subprocess.Popen) -> None:
    """Terminates a process the benchmark started; kills it if it takes over 30 s to exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[_format(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |"
             for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save(name: str, title: str, body: str, command: str) -> Path:
    """Prints a result and saves it as benchmarks/results/<name>.md with how it was made."""
    RESULTS.mkdir(exist_ok=True)
    text = (f"# {title}\n\n{body}\n\nCommand: `{command}`  \n"
            f"Machine: {platform.machine()}, {platform.system()}, Python "
            f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"saved to {path}")
    return path


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
