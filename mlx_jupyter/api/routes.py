"""The route table, relative to the server's base_url."""

from .handlers import (
    DatabaseHandler,
    GenerateHandler,
    RequestHandler,
    RequestsHandler,
    SettingHandler,
    SettingsHandler,
    StatusHandler,
)

API = r"mlx/api"

ROUTES = [
    (rf"{API}/status", StatusHandler),
    (rf"{API}/generate", GenerateHandler),
    (rf"{API}/settings", SettingsHandler),
    (rf"{API}/settings/(?P<key>[A-Za-z0-9_.-]+)", SettingHandler),
    (rf"{API}/database", DatabaseHandler),
    (rf"{API}/requests", RequestsHandler),
    (rf"{API}/requests/(?P<request_id>[A-Za-z0-9_-]+)", RequestHandler),
]
