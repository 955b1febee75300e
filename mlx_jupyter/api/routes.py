"""The route table, relative to the server's base_url."""

import functools

from .handlers import (
    DatabaseHandler,
    GenerateHandler,
    ModelActionHandler,
    ModelHandler,
    ModelsHandler,
    OpenAPIHandler,
    QueueHandler,
    RequestHandler,
    RequestsHandler,
    SettingHandler,
    SettingsHandler,
    StatusHandler,
)
from .metrics_handler import MetricsHandler
from .openai_handlers import (
    ChatCompletionsHandler,
    CompletionsHandler,
    ModelsV1Handler,
    ModelV1Handler,
)
from .openapi import document

API = r"mlx/api"
V1 = r"mlx/v1"

ROUTES = [
    (rf"{API}/status", StatusHandler),
    (rf"{API}/openapi.json", OpenAPIHandler),
    (rf"{API}/generate", GenerateHandler),
    (rf"{API}/models", ModelsHandler),
    # Names may hold one "/" (Hugging Face repo ids such as mlx-community/Llama-3.2-1B).
    (rf"{API}/models/(?P<name>[^/]+(?:/[^/]+)?)/(?P<action>load|unload|pin|unpin)",
     ModelActionHandler),
    (rf"{API}/models/(?P<name>[^/]+(?:/[^/]+)?)", ModelHandler),
    (rf"{API}/settings", SettingsHandler),
    (rf"{API}/settings/(?P<key>[A-Za-z0-9_.-]+)", SettingHandler),
    (rf"{API}/database", DatabaseHandler),
    (rf"{API}/queue", QueueHandler),
    (rf"{API}/requests", RequestsHandler),
    (rf"{API}/requests/(?P<request_id>[A-Za-z0-9_-]+)", RequestHandler),
    (rf"{V1}/models", ModelsV1Handler),
    (rf"{V1}/models/(?P<name>[^/]+(?:/[^/]+)?)", ModelV1Handler),
    (rf"{V1}/chat/completions", ChatCompletionsHandler),
    (rf"{V1}/completions", CompletionsHandler),
    (r"mlx/metrics", MetricsHandler),
]


@functools.cache
def openapi_document(base_url: str) -> dict:
    """The OpenAPI document of ROUTES: fixed for the life of the process, built once (it takes
    a few milliseconds of the event loop)."""
    return document(ROUTES, base_url=base_url)
