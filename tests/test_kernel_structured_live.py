"""Reasoning on the kernel side against the real server: a model that thinks (a random-weight
Llama whose tokenizer has <think> and </think> and whose chat template opens a thinking
block, unless chat_template_kwargs says enable_thinking false) gives the client `reasoning`,
and the `%%mlx` cell a folded "Reasoning" display above its answer, in a real kernel."""

from __future__ import annotations

import html
import json

import nbclient
import nbformat
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_jupyter import Client
from model_factory import llama_config, make_model

THINKER = "thinker"
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% if enable_thinking is not defined or enable_thinking %}"
    "{{ '<think>' }}{% endif %}{% endif %}")
ASKED = [{"role": "user", "content": "Why is the sea blue?"}]
# Random weights rarely end a thought: every token here is reasoning.
THOUGHT = {"model": THINKER, "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def thinker(live_server):
    from tokenizers import Tokenizer

    folder = live_server.root_dir / THINKER
    hidden, layers = 64, 2
    make_model(folder, hidden=hidden, layers=layers, age_seconds=0)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.add_special_tokens(["<think>", "</think>"])
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    (folder / "config.json").write_text(json.dumps(
        {**llama_config(hidden, layers), "vocab_size": vocab}))
    tensors = load_file(str(folder / "model.safetensors"))
    rows = tensors["model.embed_tokens.weight"]
    extra = np.random.default_rng(2).standard_normal((vocab - rows.shape[0], hidden),
                                                     dtype=np.float32) * 0.02
    tensors["model.embed_tokens.weight"] = np.concatenate([rows, extra])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "mlx"})
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": THINKING_TEMPLATE}))
    answer = live_server.request("POST", "mlx/api/models",
                                 json={"name": THINKER, "path": str(folder)})
    assert answer.status_code == 201, answer.text
    yield THINKER
    # The server is the session's: other tests count its loaded models.
    assert live_server.request("POST", f"mlx/api/models/{THINKER}/unload").status_code == 200
    assert live_server.request("DELETE", f"mlx/api/models/{THINKER}").status_code in (200, 204)


def test_the_client_reads_reasoning_whole_and_streamed(live_server, thinker):
    with Client(live_server.url, live_server.token) as client:
        whole = client.chat(ASKED, **THOUGHT)
        assert whole.reasoning and whole.text == "", whole
        with client.stream(messages=ASKED, **THOUGHT) as events:
            received = list(events)
            assert events.text == "" and events.reasoning == whole.reasoning
        assert "".join(e["reasoning"] for e in received if "reasoning" in e) == whole.reasoning
        assert events.result.reasoning == whole.reasoning
        # chat_template_kwargs reaches the template: no thinking block, no reasoning.
        plain = client.chat(ASKED, chat_template_kwargs={"enable_thinking": False},
                            **THOUGHT)
        assert plain.reasoning is None and plain.text


def test_a_cell_shows_the_reasoning_folded_above_the_answer(kernel_env, thinker, tmp_path):
    cells = ["%load_ext mlx_jupyter",
             f"%%mlx {THINKER} --max-tokens 8 --temperature 0\nWhy is the sea blue?",
             f"%%mlx {THINKER} --max-tokens 8 --temperature 0 --no-stream\nWhy is the sea blue?"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    with Client(kernel_env.url, kernel_env.token) as client:
        expected = client.chat([{"role": "user", "content": "Why is the sea blue?"}],
                               **THOUGHT).reasoning
    for cell in notebook.cells[1:]:
        assert not [o for o in cell.outputs if o.output_type == "stream"], cell.outputs
        shown = [o for o in cell.outputs if o.output_type == "display_data"]
        fold, footer = shown[0], shown[-1]
        assert fold["data"]["text/html"] == (
            "<details><summary>Reasoning</summary><div style='white-space:pre-wrap;"
            f"opacity:0.75'>{html.escape(expected)}</div></details>")
        assert fold["data"]["text/plain"] == f"Reasoning: {expected}"
        assert footer["data"]["text/plain"].startswith(f"{THINKER} · 8 tokens")
