"""Bodies no client should send, against a live server: each is a 400 that says what is wrong
(in OpenAI's shape under mlx/v1), never a 5xx, and the server goes on serving."""

from __future__ import annotations

import pytest

# name -> (raw body with {good} standing for a valid field of the route, what the answer says)
HOSTILE = {
    "malformed": (b'{{good}', "not valid JSON"),
    "invalid UTF-8": (b'{"model": "\xff\xfe"}', "not valid JSON"),
    "nested 5,000 deep": (b'{"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid JSON"),
    "a 5,000-digit number": (b'{{good}, "max_tokens": ' + b"9" * 5000 + b"}",
                             "not valid JSON"),
    "NaN": (b'{{good}, "temperature": NaN}', "finite number"),
    "Infinity": (b'{{good}, "top_p": Infinity}', "finite number"),
    "1e400": (b'{{good}, "temperature": 1e400}', "finite number"),
    "an array": (b"[1, 2]", "object"),
    "empty": (b"", "not valid JSON"),
    "a lone surrogate": (b'{"model": "\\ud800"}', "not valid JSON"),
}
ROUTES = {
    "mlx/api/generate": b'"model": "demo", "prompt": "x"',
    "mlx/v1/chat/completions": b'"model": "demo", "messages": [{"role": "user", "content": "x"}]',
    "mlx/v1/completions": b'"model": "demo", "prompt": "x"',
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_body_is_a_400_that_says_why(live_server, route, name):
    raw, says = HOSTILE[name]
    answer = live_server.request("POST", route,
                                 content=raw.replace(b"{good}", ROUTES[route]),
                                 headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    body = answer.json()
    message = body["error"]["message"] if route.startswith("mlx/v1") else body["message"]
    assert says in message, message


def test_the_server_still_serves_after_them(live_server):
    answer = live_server.request("POST", "mlx/api/generate",
                                 json={"model": "demo", "prompt": "The sea", "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
