"""Small random-weight Llama model folders for tests and benchmarks, written in milliseconds.

Weights are written by the `safetensors` package (numpy), an implementation independent of
the header reader under test; the tokenizer files are the bundled demo model's, so the folders
load in mlx-lm. Files are backdated by default: caches do not trust folders written within the
last two seconds (see `mlx_jupyter.models.memory.RACY_WINDOW_NS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

DEMO = Path(__file__).resolve().parent.parent / "mlx_jupyter" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB_SIZE = 2048  # the demo tokenizer's


@dataclass(frozen=True)
class FakeModel:
    path: Path
    weight_bytes: int  # exact bytes of every tensor written
    weight_files: tuple[Path, ...]


def llama_config(hidden: int, layers: int, dtype: str = "float32",
                 kv_heads: int | None = None) -> dict:
    """Heads of 32 dimensions; `kv_heads` fewer than them makes grouped-query attention. The
    context (4,096) holds the long answers the memory tests and the soak need; random weights
    rarely end an answer early."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "num_hidden_layers": layers,
            "intermediate_size": hidden * 3, "num_attention_heads": max(1, hidden // 32),
            "num_key_value_heads": kv_heads or max(1, hidden // 32), "rms_norm_eps": 1e-5,
            "vocab_size": VOCAB_SIZE, "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 4,
            "pad_token_id": 5, "torch_dtype": dtype}


def llama_tensors(hidden: int, layers: int, dtype: str = "float32",
                  seed: int = 0, kv_heads: int | None = None) -> dict[str, np.ndarray]:
    """Random tensors with the names and shapes mlx-lm's Llama expects."""
    rng = np.random.default_rng(seed)
    kv_width = (kv_heads or max(1, hidden // 32)) * (hidden // max(1, hidden // 32))

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)

    inner = hidden * 3
    tensors = {"model.embed_tokens.weight": random(VOCAB_SIZE, hidden),
               "model.norm.weight": np.ones(hidden, dtype=dtype)}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        for proj in ("q_proj", "o_proj"):
            tensors[f"{prefix}.self_attn.{proj}.weight"] = random(hidden, hidden)
        for proj in ("k_proj", "v_proj"):
            tensors[f"{prefix}.self_attn.{proj}.weight"] = random(kv_width, hidden)
        tensors[f"{prefix}.mlp.gate_proj.weight"] = random(inner, hidden)
        tensors[f"{prefix}.mlp.up_proj.weight"] = random(inner, hidden)
        tensors[f"{prefix}.mlp.down_proj.weight"] = random(hidden, inner)
        tensors[f"{prefix}.input_layernorm.weight"] = np.ones(hidden, dtype=dtype)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = np.ones(hidden, dtype=dtype)
    return tensors


def make_model(folder: str | os.PathLike[str], *, hidden: int = 64, layers: int = 2,
               dtype: str = "float32", kv_heads: int | None = None, shards: int = 1,
               extra_files: int = 0,
               config: dict | None = None, tokenizer: bool = True,
               age_seconds: float = 60.0) -> FakeModel:
    """A loadable Llama model folder: config.json, weights in `shards` files (with the index
    mlx-lm writes when there are several), the demo tokenizer and `extra_files` small files.
    Weight bytes: 4·hidden·(2048 + 3·layers·hidden) at float32, roughly."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(
        json.dumps(config or llama_config(hidden, layers, dtype, kv_heads)))
    tensors = llama_tensors(hidden, layers, dtype, kv_heads=kv_heads)
    files = _write_weights(path, tensors, shards)
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copyfile(DEMO / name, path / name)
    for i in range(extra_files):
        (path / f"extra-{i:05d}.txt").write_text(f"file {i}\n")
    if age_seconds:
        backdate(path, age_seconds)
    weight_bytes = sum(t.nbytes for t in tensors.values())
    return FakeModel(path, weight_bytes, tuple(files))


def _write_weights(path: Path, tensors: dict[str, np.ndarray], shards: int) -> list[Path]:
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "mlx"})
        return [path / "model.safetensors"]
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"{shards} shards need at least as many tensors; add layers")
    files, weight_map = [], {}
    for i, group in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in group}, str(path / file_name),
                  metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(group, file_name))
        files.append(path / file_name)
    total = sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return files


def backdate(path: str | os.PathLike[str], seconds: float = 60.0) -> None:
    """Moves the mtime of a folder and the files in it `seconds` into the past."""
    then = time.time_ns() - int(seconds * 1e9)
    for entry in os.scandir(path):
        os.utime(entry.path, ns=(then, then), follow_symlinks=False)
    os.utime(path, ns=(then, then))


def make_hf_cache_repo(cache_dir: str | os.PathLike[str], repo_id: str, source: Path, *,
                       repo_type: str = "model", commit: str | None = None,
                       age_seconds: float = 60.0) -> Path:
    """Puts a folder into a Hugging Face cache the way huggingface_hub lays it out:
    <type>s--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>,
    refs/main}. Returns the snapshot folder."""
    repo_dir = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        blob_hash = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo_dir / "blobs" / blob_hash)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob_hash))
    (repo_dir / "refs" / "main").write_text(commit)
    if age_seconds:
        for folder in (repo_dir / "blobs", snapshot, repo_dir / "refs", repo_dir / "snapshots",
                       repo_dir):
            backdate(folder, age_seconds)
    return snapshot


# -- a model whose chat template has tool support --------------------------------------------

# The demo's chat format (<|role|>...<|end|>) with tools in the Hermes style that Qwen 2.5 and
# NousResearch's models use: the tools' JSON inside <tools></tools> in the system turn, each
# call as {"name", "arguments"} inside <tool_call></tool_call>, a tool's answer inside
# <tool_response></tool_response>. mlx-lm infers its json_tools parser from `<tool_call>` and
# `tool_call.name` in the template. Contents are joined with `+`, as in the demo's template,
# so that content given as a list of parts (not flattened) fails loudly rather than printing
# the list.
TOOL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}"
    "{{- '<|system|>' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|end|>' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|system|>' + messages[0]['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{%- if not loop.first %}{{- '<|system|>' + message['content'] + '<|end|>' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|assistant|>' }}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|user|><tool_response>\\n' + message['content'] + '\\n</tool_response><|end|>' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


SPECIAL_TOKENS = ("<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>")


def train_tokenizer(folder: str | os.PathLike[str], vocab_size: int,
                    texts: list[str] | None = None) -> None:
    """Writes a byte-level BPE tokenizer of `vocab_size` pieces with the demo's special tokens
    (same ids, same tokenizer_config.json), trained in ~0.5 s on Python's own documentation
    (pydoc_data.topics: ~465 KB of English prose and code, PSF license, in every CPython). With
    8,192 pieces, long English prompts take about a third fewer tokens than with the demo's
    2,048. `texts`: another corpus (that one tops out at ~9,200 pieces)."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts or sorted(pydoc_data.topics.topics.values()), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 0)])
    tok.save(str(path / "tokenizer.json"))
    for name in TOKENIZER_FILES[1:]:
        shutil.copyfile(DEMO / name, path / name)


def make_tool_model(folder: str | os.PathLike[str], *, context: int = 8192,
                    vocab_size: int | None = None, favour: tuple[str, ...] = (),
                    hidden: int = 64, layers: int = 2,
                    age_seconds: float = 60.0) -> FakeModel:
    """A random-weight Llama folder whose chat template has tool support (TOOL_CHAT_TEMPLATE)
    and whose context holds `context` tokens: for clients whose prompts carry many tools
    (jupyter-ai's Jupyternaut sends 14 with a 13,000-character system prompt). Its tokenizer is
    the demo's, or with `vocab_size` one trained by train_tokenizer (the embedding sized to
    it).

    `favour`: pieces of the vocabulary (e.g. "{" and "}") that the model then prefers at every
    step, whatever came before, by ~14 in logit over all others: random weights otherwise
    never end a JSON object whose schema leaves keys open (a tool without parameters is
    `{"type": "object", "properties": {}}`), so a forced call of such a tool would run to
    max_tokens; favouring "{" and "}", it writes `{}` (where `{` is valid, "}" is not, and the
    other way round). Made in the tied embedding: every row shares a component along one
    axis, which the final norm turns into most of the hidden state, and the favoured rows have
    more of it."""
    vocab = vocab_size or VOCAB_SIZE
    config = {**llama_config(hidden, layers), "max_position_embeddings": context,
              "vocab_size": vocab}
    path = Path(folder)
    make_model(path, hidden=hidden, layers=layers, config=config, tokenizer=vocab_size is None,
               age_seconds=0)
    tensors = llama_tensors(hidden, layers)
    if vocab_size:
        train_tokenizer(path, vocab_size)
        rng = np.random.default_rng(1)
        tensors["model.embed_tokens.weight"] = (
            rng.standard_normal((vocab, hidden), dtype=np.float32) * 0.02)
    if favour:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        embedding = tensors["model.embed_tokens.weight"]
        embedding[:, 0] += 1.0
        for piece in favour:
            if (favoured := tokenizer.token_to_id(piece)) is None:
                raise ValueError(f"{piece!r} is not one piece of this model's vocabulary")
            embedding[favoured, 0] += 2.0
    if vocab_size or favour:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "mlx"})
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.update(chat_template=TOOL_CHAT_TEMPLATE, model_max_length=context)
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if age_seconds:
        backdate(path, age_seconds)
    return FakeModel(path, sum(t.nbytes for t in tensors.values()),
                     (path / "model.safetensors",))
