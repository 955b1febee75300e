"""How many positions a model's context holds, from its config.json.

Read by the worker (which caps each request to it) and nothing else; the server never needs it
before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
