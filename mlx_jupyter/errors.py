"""Domain errors of mlx-jupyter.

Services raise these; the API layer maps them to HTTP statuses in one place
(`mlx_jupyter.api.handlers`). Each message is one line a user can act on.
"""


class MlxJupyterError(Exception):
    """Base of every error the services raise on purpose."""

    status = 500
    param: str | None = None  # the request field at fault, when there is one
    fault: str | None = None  # the kind faults_total counts it as, if it counts (metrics)


class InvalidRequest(MlxJupyterError):
    status = 400

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class BadBody(InvalidRequest):
    """A body that is no JSON object at all: not JSON, not UTF-8, nested too deep, a number
    that is not finite, or not an object. Unlike a bad field, no working client sends one."""


class BodyTooLarge(MlxJupyterError):
    """A body past c.MlxApp.max_body_bytes, refused before it is read whole."""

    status = 413

    def __init__(self, limit: int, declared: int | None = None):
        size = "is" if declared is None else f"is {declared} bytes,"  # None: sent in chunks
        super().__init__(f"the request body {size} over the limit of {limit} bytes "
                         f"(c.MlxApp.max_body_bytes): send a smaller one, or raise the limit")


class ModelNotFound(MlxJupyterError):
    status = 404

    def __init__(self, name: str, available: list[str]):
        names = ", ".join(sorted(available)) or "none"
        super().__init__(f"unknown model {name!r}; available models: {names}")
        self.name = name
        self.param = "model"


class WorkerError(MlxJupyterError):
    """A model worker could not start, or died while it served requests."""

    status = 503


class ModelDoesNotFit(MlxJupyterError):
    """Loading would exceed the memory budget or the loaded-model limit, even after eviction."""

    status = 409


class RequestDoesNotFit(MlxJupyterError):
    """A request whose prompt and max_tokens need more KV cache than its model reserves: what
    the server is configured to hold refuses it (c.MlxApp.kv_reserve_tokens), not its form."""

    status = 409

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class PromptTooLong(RequestDoesNotFit):
    """A prompt that fills its model's context, leaving no room for an answer. Like a request
    too big for the KV reservation, it is well formed: the model's size refuses it (so its
    status is the same 409; on /v1 the code is context_length_exceeded)."""

    fault = "prompt_too_long"


class ModelBusy(MlxJupyterError):
    """The model has requests in flight, so it cannot be unloaded now."""

    status = 409
