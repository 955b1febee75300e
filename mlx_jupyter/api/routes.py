"""The route table, relative to the server's base_url."""

import functools

from .handlers import (
    DatabaseHandler,
    GenerateHandler,
    ModelHandler,
    ModelsHandler,
    NotFoundHandler,
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
    OpenAINotFoundHandler,
)
from .openapi import document

API = r"mlx/api"
V1 = r"mlx/v1"
# A model's name is the whole rest of the path: it may hold "/" (Hub repo ids such as
# mlx-community/Llama-3.2-1B) and end in any word; only POST reads a last word as an action.
MODEL = r"(?P<name>.+)"

ROUTES = [
    (rf"{API}/status", StatusHandler),
    (rf"{API}/openapi.json", OpenAPIHandler),
    (rf"{API}/generate", GenerateHandler),
    (rf"{API}/models", ModelsHandler),
    (rf"{API}/models/{MODEL}", ModelHandler),
    (rf"{API}/settings", SettingsHandler),
    (rf"{API}/settings/(?P<key>[A-Za-z0-9_.-]+)", SettingHandler),
    (rf"{API}/database", DatabaseHandler),
    (rf"{API}/queue", QueueHandler),
    (rf"{API}/requests", RequestsHandler),
    (rf"{API}/requests/(?P<request_id>[A-Za-z0-9_-]+)", RequestHandler),
    (rf"{V1}/models", ModelsV1Handler),
    (rf"{V1}/models/{MODEL}", ModelV1Handler),
    (rf"{V1}/chat/completions", ChatCompletionsHandler),
    (rf"{V1}/completions", CompletionsHandler),
    (r"mlx/metrics", MetricsHandler),
    # Last: whatever else is asked under mlx/ is a JSON 404, not Jupyter's page.
    (rf"{V1}/.*", OpenAINotFoundHandler),
    (r"mlx/.*", NotFoundHandler),
]


@functools.cache
def openapi_document(base_url: str) -> dict:
    """The OpenAPI document of ROUTES: fixed for the life of the process, built once (it takes
    a few milliseconds of the event loop)."""
    return document(ROUTES, base_url=base_url)
