"""What the server remembers of models across a restart: registrations and pins stay, a model
that was deleted stays deleted (its history stays too)."""

from __future__ import annotations

import httpx

from live_server import start_server, stop_server
from model_factory import make_model


def call(live, method, path, **kwargs):
    return httpx.request(method, live.url + path, timeout=120,
                         headers={"Authorization": f"token {live.token}"}, **kwargs)


def test_a_deleted_model_stays_deleted_and_a_kept_one_stays(tmp_path):
    root = tmp_path / "server"
    folders = tmp_path / "server" / "notebooks"  # the server's root_dir: an allowed root
    for name in ("kept", "gone"):
        make_model(folders / name)
    live = start_server(root, tmp_path / "first.log")
    try:
        for name in ("kept", "gone"):
            answer = call(live, "POST", "mlx/api/models",
                          json={"name": name, "path": str(folders / name)})
            assert answer.status_code == 201, answer.text
        assert call(live, "POST", "mlx/api/models/kept/pin", json={}).json()["pinned"]
        used = call(live, "POST", "mlx/api/generate",
                    json={"model": "gone", "prompt": "hello", "max_tokens": 2}).json()
        assert call(live, "DELETE", "mlx/api/models/gone").status_code == 200
    finally:
        stop_server(live)

    live = start_server(root, tmp_path / "second.log")
    try:
        names = {m["name"] for m in call(live, "GET", "mlx/api/models").json()["models"]}
        assert "kept" in names and "gone" not in names
        assert call(live, "GET", "mlx/api/models/kept").json()["pinned"] is True
        assert call(live, "GET", "mlx/api/models/gone").status_code == 404
        # Its history stays.
        row = call(live, "GET", f"mlx/api/requests/{used['request_id']}").json()
        assert row["model"] == "gone" and row["status"] == "completed"
        # And it can be registered again.
        answer = call(live, "POST", "mlx/api/models",
                      json={"name": "gone", "path": str(folders / "gone")})
        assert answer.status_code == 201, answer.text
    finally:
        stop_server(live)
