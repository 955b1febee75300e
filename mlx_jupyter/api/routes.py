"""The route table, relative to the server's base_url."""

from .handlers import GenerateHandler, StatusHandler

API = r"mlx/api"

ROUTES = [
    (rf"{API}/status", StatusHandler),
    (rf"{API}/generate", GenerateHandler),
]
