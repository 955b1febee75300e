"""What the server remembers of models across a restart: registrations and pins stay, a model
that was deleted stays deleted (its history stays too)."""

from __future__ import annotations


from live_server import start_server, stop_server
from model_factory import make_model




def test_a_deleted_model_stays_deleted_and_a_kept_one_stays(tmp_path):
    root = tmp_path / "server"
    folders = tmp_path / "server" / "notebooks"  # the server's root_dir: an allowed root
    for name in ("kept", "gone"):
        make_model(folders / name)
    live = start_server(root, tmp_path / "first.log")
    try:
        for name in ("kept", "gone"):
            answer = live.request("POST", "mlx/api/models",
                          json={"name": name, "path": str(folders / name)})
            assert answer.status_code == 201, answer.text
        assert live.request("POST", "mlx/api/models/kept/pin", json={}).json()["pinned"]
        used = live.request("POST", "mlx/api/generate",
                    json={"model": "gone", "prompt": "hello", "max_tokens": 2}).json()
        assert live.request("DELETE", "mlx/api/models/gone").status_code == 200
    finally:
        stop_server(live)

    live = start_server(root, tmp_path / "second.log")
    try:
        names = {m["name"] for m in live.request("GET", "mlx/api/models").json()["models"]}
        assert "kept" in names and "gone" not in names
        assert live.request("GET", "mlx/api/models/kept").json()["pinned"] is True
        assert live.request("GET", "mlx/api/models/gone").status_code == 404
        # Its history stays.
        row = live.request("GET", f"mlx/api/requests/{used['request_id']}").json()
        assert row["model"] == "gone" and row["status"] == "completed"
        # And it can be registered again.
        answer = live.request("POST", "mlx/api/models",
                      json={"name": "gone", "path": str(folders / "gone")})
        assert answer.status_code == 201, answer.text
    finally:
        stop_server(live)
