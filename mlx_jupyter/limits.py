"""Limits and defaults, each stated once.

The request schemas (native and OpenAI), the stored settings, the `%%mlx` options and the panel
take their ranges from here, so that a value one of them accepts none of the others refuses. The
server's traits (`app.MlxApp`), the model manager and the worker's command line take their
defaults from here, so that a worker started by hand behaves as one the server starts.

Pure constants and arithmetic: the kernel side imports this module too.
"""

MIB = 1024**2

# -- what a request may ask for ----------------------------------------------------------------
MAX_TOKENS = 32768  # max_tokens is from 1 to this
MAX_TEMPERATURE = 2.0  # temperature is from 0 (greedy) to this
# top_p is above 0 and at most 1.
MAX_SEED = 2**32 - 1  # seeds are from 0 to this (what mlx.random.key takes)
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000  # higher first
MAX_TIMEOUT_SECONDS = 86400.0
MAX_PROMPT_CHARS = 1_000_000  # a prompt, or one message's content
MAX_MESSAGES = 1000
MAX_STOP_STRINGS = 16
MAX_CHOICES = 8  # n: answers generated for one request, each taking a batch slot
MAX_TOP_LOGPROBS = 20  # top_logprobs: alternatives shown per token (OpenAI's bound)
MAX_LEGACY_LOGPROBS = 5  # the legacy completions' integer logprobs (OpenAI's bound)
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty are from -this to this (OpenAI's)
MAX_REPETITION_PENALTY = 10.0  # above 0 and at most this; 1 changes nothing
MAX_LOGIT_BIAS = 100.0  # a logit_bias value is from -this to this (OpenAI's)
MAX_LOGIT_BIAS_ENTRIES = 1024
PENALTY_CONTEXT_TOKENS = 64  # the recent tokens the penalties look back on
MAX_TOOLS = 128
MAX_PARALLEL_CALLS = 8  # tool calls one forced answer may make at once
MAX_SCHEMA_BYTES = 256 * 1024  # a JSON schema (response_format, a tool's parameters), as JSON
MAX_MODEL_NAME_CHARS = 256  # Hub repo ids (org/name) fit with room to spare
MAX_NOTEBOOK_CHARS = 4096  # a kernel's JPY_SESSION_NAME is a path
MAX_PATH_CHARS = 4096

# What a model can be asked to do: POST mlx/api/models/{name}/{action}.
MODEL_ACTIONS = ("load", "unload", "pin", "unpin")

# -- what the stored settings start as (mlx/api/settings; a request that leaves one out) --------
DEMO_MODEL_NAME = "demo"  # the bundled model
DEFAULT_MODEL = DEMO_MODEL_NAME
DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 1.0

# -- what the server and its workers hold -------------------------------------------------------

# Requests one model worker generates at once (continuous batching).
DEFAULT_MAX_BATCH_SIZE = 8
# Bytes of KV state a worker keeps for prompt prefixes it has seen; 0 turns the cache off.
DEFAULT_PROMPT_CACHE_BYTES = 256 * MIB
# KV positions reserved per batch slot: a loaded model is counted for
# max_batch_size × this × its KV bytes per token, and the batch holds no more than that.
DEFAULT_KV_RESERVE_TOKENS = 4096
# What a worker process holds beyond its model (Python, mlx, mlx-lm): ~86 MiB on Linux.
DEFAULT_WORKER_BASE_BYTES = 96 * MIB
# Seconds without a heartbeat from a worker's heartbeat thread (which does no MLX work, so a
# long prefill still beats) after which the worker is taken for hung, killed and replaced.
DEFAULT_WORKER_HEARTBEAT_SECONDS = 30.0

# -- what a client may make the server hold -------------------------------------------------------
# Bytes of a request body; a larger one is refused (413) before it is read whole.
DEFAULT_MAX_BODY_BYTES = 16 * MIB
# Bytes of a stream's answer that may wait for a client that does not read; past it the request
# is cancelled (slow_client) so that it stops holding a batch slot.
DEFAULT_STREAM_BUFFER_BYTES = 1 * MIB
# Unsent bytes a stream's socket holds in the kernel (TCP_NOTSENT_LOWAT): beyond it, what a
# client has not read waits where stream_buffer_bytes counts it.
STREAM_SOCKET_UNSENT_BYTES = 16 * 1024

# -- the database ---------------------------------------------------------------------------------
# Seconds a PostgreSQL connection may take to open (psycopg's connect_timeout) before the
# database counts as not answering; a URL's own ?connect_timeout= wins.
DATABASE_CONNECT_TIMEOUT_SECONDS = 5
# A write the database could not take (it stopped answering, or is full) is kept and tried again
# after this many seconds, the wait doubling after each failed try up to the most.
DATABASE_RETRY_FIRST_SECONDS = 0.5
DATABASE_RETRY_MAX_SECONDS = 10.0
# Writes kept while the database cannot take them (a request makes about three); past it a new
# write is dropped, and logged.
MAX_KEPT_WRITES = 10_000
# Seconds an interactive request's answer waits for its row to be written before its headers
# (with its id) go out, so that a crash cannot lose a request its client was told of; the row
# is usually written long before (while the request waits for its turn). Past it (a database
# that does not answer) the answer goes on and the row lands later.
RECORD_WAIT_SECONDS = 2.0


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
