"""The example notebooks, executed by nbclient in a real kernel against a real server."""

import os
import signal
import time
from pathlib import Path

import httpx
import nbclient
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, cwd: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def outputs_of(notebook: nbformat.NotebookNode, source_start: str) -> list:
    [cell] = [c for c in notebook.cells if c.cell_type == "code"
              and c.source.startswith(source_start)]
    return cell.outputs


def markdown_texts(outputs: list) -> list[str]:
    return [o["data"]["text/markdown"] for o in outputs
            if o.output_type in ("display_data", "execute_result") and "text/markdown" in o["data"]]


def test_quickstart_notebook_streams_answers_from_the_demo_model(kernel_env, tmp_path,
                                                                  monkeypatch):
    # What Jupyter's session manager tells a kernel it starts for a notebook.
    monkeypatch.setenv("JPY_SESSION_NAME", str(tmp_path / "quickstart.ipynb"))
    notebook = run_notebook("quickstart.ipynb", tmp_path)
    for magic in ("%%mlx demo", "%%mlx --max-tokens 48"):
        outputs = outputs_of(notebook, magic)
        assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
        answer, footer = markdown_texts(outputs)
        assert sum(ch.isalpha() for ch in answer) >= 10  # generated words, not an empty cell
        assert "demo ·" in footer and "tokens" in footer

    status = "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
                     for o in outputs_of(notebook, "%mlx status"))
    assert "demo" in status

    printed = "".join(o.text for o in outputs_of(notebook, "from mlx_jupyter import Client")
                      if o.output_type == "stream")
    text, reason_line = printed.rstrip("\n").rsplit("\n", 1)
    assert text.strip() and reason_line.split()[0] in ("stop", "length")

    history = kernel_env.get("mlx/api/requests",
                             params={"notebook": str(tmp_path / "quickstart.ipynb")}).json()
    assert history["total"] == 3  # two %%mlx cells and one Client call, all from this notebook
    assert {row["status"] for row in history["requests"]} == {"completed"}


def test_mlx_runs_in_the_worker_never_in_the_server_process(live_server):
    maps = Path(f"/proc/{live_server.process.pid}/maps")
    if not maps.exists():
        pytest.skip("needs /proc to read the server's memory maps")
    answer = httpx.post(live_server.url + "mlx/api/generate", timeout=120,
                        headers={"Authorization": f"token {live_server.token}"},
                        json={"model": "demo", "prompt": "The sea", "max_tokens": 8})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    assert "libmlx" not in maps.read_text()
    loaded = live_server.get("mlx/api/status").json()["models"]["loaded"]
    assert loaded and all(Path(f"/proc/{m['pid']}/maps").read_text().count("libmlx")
                          for m in loaded)


def test_a_client_that_disconnects_cancels_its_request(live_server):
    headers = {"Authorization": f"token {live_server.token}"}
    body = {"model": "demo", "prompt": "The sea", "max_tokens": 8, "stream": True}
    assert httpx.post(live_server.url + "mlx/api/generate", headers=headers, timeout=120,
                      json={**body, "stream": False}).status_code == 200
    [worker] = live_server.get("mlx/api/status").json()["models"]["loaded"]
    os.kill(worker["pid"], signal.SIGSTOP)  # the request stays in flight until we let go
    try:
        with httpx.stream("POST", live_server.url + "mlx/api/generate", headers=headers,
                          json=body, timeout=120) as response:
            request_id = response.headers["X-Request-Id"]
        # The response is closed before any token: the server must cancel the request.
    finally:
        os.kill(worker["pid"], signal.SIGCONT)
    deadline = time.monotonic() + 30
    while live_server.get(f"mlx/api/requests/{request_id}").json()["status"] == "running":
        assert time.monotonic() < deadline, "the request was never cancelled"
        time.sleep(0.05)
    record = live_server.get(f"mlx/api/requests/{request_id}").json()
    assert record["status"] == "cancelled" and record["finish_reason"] == "cancelled"
