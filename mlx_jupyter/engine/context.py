"""How many positions a model's context holds, and which prompts cannot fit it.

The worker reads the context from the model's config.json, caps each request's max_tokens to
what it leaves, and refuses a prompt that fills it once tokenized. It also tells the server
(ready event) the context and the most prompt bytes one token of its tokenizer stands for, so
that the server refuses a prompt that is certainly too long before sending it: one of B bytes
is at least B / max_token_bytes tokens.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .protocol import GenerationParams

# The names architectures give their context length, most common first (Llama and most since:
# max_position_embeddings; GPT-2: n_positions, n_ctx; others: the rest).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len",
                "seq_length", "max_sequence_length")


def context_length(config: Mapping[str, Any]) -> int | None:
    """The context length a config declares, or None when it declares none. A multimodal
    model's language part (text_config) is what holds the text."""
    for source in (config, config.get("text_config")):
        if not isinstance(source, Mapping):
            continue
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def prompt_bytes(params: GenerationParams) -> int:
    """The UTF-8 bytes of a request's prompt, or of its messages' contents."""
    if params["prompt"] is not None:
        return len(params["prompt"].encode("utf-8", "surrogatepass"))
    return sum(len((message["content"] or "").encode("utf-8", "surrogatepass"))
               for message in params["messages"] or [])


def prompt_field(params: GenerationParams) -> str:
    """The request field that holds its prompt."""
    return "prompt" if params["prompt"] is not None else "messages"


def certain_refusal(params: GenerationParams, context_tokens: int | None,
                    max_token_bytes: int) -> str | None:
    """Why a prompt certainly cannot fit its model's context (its bytes alone prove it needs
    at least as many tokens as the context holds), or None when it may fit: the worker then
    counts its tokens and refuses it if it does not."""
    if context_tokens is None:
        return None
    size = prompt_bytes(params)
    at_least = math.ceil(size / max(1, max_token_bytes))
    if at_least < context_tokens:
        return None
    return (f"the prompt is at least {at_least} tokens ({size} bytes, and no token of this "
            f"model stands for more than {max_token_bytes}) and this model's context holds "
            f"{context_tokens}, with room for at least one token of answer: shorten the prompt")
