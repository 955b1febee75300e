"""A model's context is a limit: a prompt that fills it is refused with a 409 naming both
lengths (well formed, it is the model that cannot hold it, as with the KV reservation), and a
max_tokens past it is cut to what remains, which the answer says.

A prompt whose bytes alone prove it too long is refused by the server before it reaches the
worker (the demo's longest token stands for 15 bytes: 256 × 15 bytes certainly do not fit);
a shorter one that does not fit once tokenized is refused by the worker, with its exact count."""

from __future__ import annotations

import json
import math

import pytest

from mlx_jupyter.engine.context import certain_refusal, context_length
from mlx_jupyter.engine.protocol import PARAM_DEFAULTS

DEMO_CONTEXT = 256  # the bundled model's max_position_embeddings
LONG = "the sea and the wind and the rain " * 200  # 6,800 bytes: certainly over 256 tokens
MEDIUM = "The sea is wide and the wind is strong. " * 40  # 1,600 bytes, 482 tokens


def test_context_length_reads_each_architectures_name():
    assert context_length({"max_position_embeddings": 4096}) == 4096
    assert context_length({"n_positions": 1024, "n_ctx": 1024}) == 1024  # GPT-2
    assert context_length({"model_type": "llava",
                           "text_config": {"max_position_embeddings": 8}}) == 8
    assert context_length({"hidden_size": 64}) is None
    assert context_length({"max_position_embeddings": True}) is None
    assert context_length({"max_position_embeddings": 0, "seq_length": 77}) == 77


def post(server, route, body):
    return server.request("POST", route, json=body)


def params(prompt=None, messages=None):
    return {**PARAM_DEFAULTS, "prompt": prompt, "messages": messages, "max_tokens": 1,
            "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}


@pytest.mark.parametrize(("prompt", "context", "token_bytes", "refused"), [
    ("x" * 40, 10, 4, True),  # at least 10 tokens: no room left for an answer
    ("x" * 37, 10, 4, True),  # at least ceil(37 / 4) = 10 tokens
    ("x" * 36, 10, 4, False),  # at least 9: it may fit, the worker counts
    ("é" * 20, 10, 4, True),  # 40 bytes of UTF-8
    ("x" * 10**6, None, 1, False),  # no context declared: nothing to check here
])
def test_the_server_refuses_only_what_certainly_cannot_fit(prompt, context, token_bytes,
                                                           refused):
    assert (certain_refusal(params(prompt), context, token_bytes) is not None) == refused
    chat = params(messages=[{"role": "user", "content": prompt}])
    assert (certain_refusal(chat, context, token_bytes) is not None) == refused


def test_a_prompt_that_certainly_fills_the_context_is_refused_before_the_worker(live_server):
    assert post(live_server, "mlx/api/models/demo/load", {}).status_code == 200
    metrics_before = live_server.get("mlx/metrics").text
    whole = post(live_server, "mlx/api/generate", {"model": "demo", "prompt": LONG})
    assert whole.status_code == 409, whole.text
    message = whole.json()["message"]
    assert f"the prompt is at least {math.ceil(len(LONG) / 15)} tokens ({len(LONG)} bytes" in message
    assert f"this model's context holds {DEMO_CONTEXT}" in message
    assert whole.json()["reason"] == "PromptTooLong"
    assert "X-Request-Id" not in whole.headers  # refused before it was even recorded
    assert fault_count(live_server.get("mlx/metrics").text) == fault_count(metrics_before) + 1


def fault_count(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith('mlx_jupyter_faults_total{kind="prompt_too_long"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_prompt_that_fills_the_context_once_tokenized_is_a_409_naming_both_lengths(
        live_server):
    whole = post(live_server, "mlx/api/generate", {"model": "demo", "prompt": MEDIUM})
    assert whole.status_code == 409, whole.text
    message = whole.json()["message"]
    assert f"this model's context holds {DEMO_CONTEXT}" in message
    prompt_tokens = int(message.split("the prompt is ")[1].split(" tokens")[0])
    assert prompt_tokens > DEMO_CONTEXT
    assert whole.json()["reason"] == "PromptTooLong"

    # Streamed, the status line has left: the refusal is the last event.
    streamed = post(live_server, "mlx/api/generate",
                    {"model": "demo", "prompt": MEDIUM, "stream": True})
    last = json.loads(streamed.text.splitlines()[-1])
    assert last["finish_reason"] == "error" and "context holds 256" in last["error"]

    chat = post(live_server, "mlx/v1/chat/completions",
                {"model": "demo", "messages": [{"role": "user", "content": MEDIUM}]})
    assert chat.status_code == 409
    error = chat.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"

    row = live_server.get(f"mlx/api/requests/{whole.headers['X-Request-Id']}").json()
    assert row["status"] == "failed" and "context holds 256" in row["error"]


def test_a_max_tokens_past_the_context_is_cut_to_what_remains_and_the_answer_says_so(
        live_server):
    answer = post(live_server, "mlx/api/generate",
                  {"model": "demo", "prompt": "The sea", "max_tokens": 1000, "temperature": 0})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    room = DEMO_CONTEXT - body["usage"]["prompt_tokens"]
    assert body["max_tokens_clipped_to"] == room
    assert body["usage"]["completion_tokens"] <= room

    fits = post(live_server, "mlx/api/generate",
                {"model": "demo", "prompt": "The sea", "max_tokens": 8, "temperature": 0})
    assert fits.json()["max_tokens_clipped_to"] is None

    streamed = post(live_server, "mlx/api/generate", {"model": "demo", "prompt": "The sea",
                                                 "max_tokens": 1000, "stream": True})
    done = json.loads(streamed.text.splitlines()[-1])
    assert done["done"] and done["max_tokens_clipped_to"] == room
