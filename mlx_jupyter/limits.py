"""Limits and defaults that more than one module needs, each stated once.

The server's traits (`app.MlxApp`), the model manager and the worker's command line all take
their defaults from here, so that a worker started by hand behaves as one the server starts.
"""

MIB = 1024**2

# Requests one model worker generates at once (continuous batching).
DEFAULT_MAX_BATCH_SIZE = 8
# Bytes of KV state a worker keeps for prompt prefixes it has seen; 0 turns the cache off.
DEFAULT_PROMPT_CACHE_BYTES = 256 * MIB
# KV positions reserved per batch slot: a loaded model is counted for
# max_batch_size × this × its KV bytes per token, and the batch holds no more than that.
DEFAULT_KV_RESERVE_TOKENS = 4096
# What a worker process holds beyond its model (Python, mlx, mlx-lm): ~86 MiB on Linux.
DEFAULT_WORKER_BASE_BYTES = 96 * MIB


def kv_capacity(max_batch_size: int, kv_reserve_tokens: int) -> int:
    """KV positions a model's whole batch may hold: what its KV reservation counts."""
    return max_batch_size * kv_reserve_tokens


def kv_refusal(prompt_tokens: int, max_tokens: int, max_batch_size: int,
               kv_reserve_tokens: int) -> str | None:
    """Why a request can never fit a model's KV reservation (its whole batch's positions),
    or None when it can. The server checks max_tokens alone; the worker, having tokenized the
    prompt, checks both."""
    capacity = kv_capacity(max_batch_size, kv_reserve_tokens)
    need = prompt_tokens + max_tokens
    if need <= capacity:
        return None
    asked = (f"{prompt_tokens} of prompt + {max_tokens} max_tokens" if prompt_tokens
             else f"max_tokens {max_tokens}")
    return (f"this request needs KV cache for {need} tokens ({asked}), more than the "
            f"{capacity} this model reserves (max_batch_size {max_batch_size} x "
            f"kv_reserve_tokens {kv_reserve_tokens}); lower max_tokens, shorten the prompt, "
            f"or raise c.MlxApp.kv_reserve_tokens")
