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
