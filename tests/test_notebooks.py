"""The example notebooks, executed by nbclient in a real kernel against a real server."""

import html
import json
import os
import re
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
    path = str(tmp_path / "quickstart.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", path)
    notebook = run_notebook("quickstart.ipynb", tmp_path)
    for magic in ("%%mlx demo", "%%mlx --max-tokens 48"):
        outputs = outputs_of(notebook, magic)
        assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
        answer, footer = markdown_texts(outputs)
        assert sum(ch.isalpha() for ch in answer) >= 10  # generated words, not an empty cell
        assert "demo ·" in footer and "tokens" in footer

    history = kernel_env.get("mlx/api/requests", params={"notebook": path}).json()
    # Five %%mlx cells and one Client call, all from this notebook.
    assert history["total"] == 6
    assert {row["status"] for row in history["requests"]} == {"completed"}
    ids = {row["id"] for row in history["requests"]}

    # The answer's metadata says how it was made.
    seeded = [o for o in outputs_of(notebook, "%%mlx --max-tokens 48")
              if o.output_type == "display_data"][-1]
    made = seeded.metadata["mlx_jupyter"]
    assert made["request_id"] in ids and made["model"] == "demo" and made["seed"] == 7
    assert made["parameters"] == {"max_tokens": 48, "temperature": 0.8, "seed": 7}

    # {topic} was filled in, and -o kept the answer.
    story = kernel_env.get(f"mlx/api/requests/{stored_id(notebook, '%%mlx --max-tokens 40')}"
                           ).json()
    assert story["messages"][-1]["content"] == "Write two sentences about lighthouses."
    printed = stream_text(outputs_of(notebook, "print(len(story"))
    assert printed.endswith("words about lighthouses\n") and int(printed.split()[0]) >= 1

    # The second --chat cell sent the first exchange along.
    second = kernel_env.get(
        f"mlx/api/requests/{stored_id(notebook, '%%mlx --chat trip', index=1)}").json()
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0]["content"] == "I am planning a walk by the sea."
    assert "trip" in stream_text(outputs_of(notebook, "%mlx chat")) + html_texts(
        outputs_of(notebook, "%mlx chat"))

    assert "demo" in stream_text(outputs_of(notebook, "%mlx status"))
    assert "<td>demo</td>" in html_texts(outputs_of(notebook, "%mlx list"))
    assert html_texts(outputs_of(notebook, "%mlx history 3")).count("<tr>") == 4  # head + 3

    printed = stream_text(outputs_of(notebook, "from mlx_jupyter import Client"))
    text, reason_line = printed.rstrip("\n").rsplit("\n", 1)
    assert text.strip() and reason_line.split()[0] in ("stop", "length")


def test_control_panel_notebook_drives_the_panel(kernel_env, tmp_path):
    notebook = run_notebook("control-panel.ipynb", tmp_path)
    shown = outputs_of(notebook, "from mlx_jupyter import panel")
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)
    assert stream_text(outputs_of(notebook, 'control.models_tab')).strip() == "demo: loaded"
    answer, footer = stream_text(outputs_of(notebook, "playground = ")).rstrip("\n").rsplit(
        "\n", 1)
    assert sum(ch.isalpha() for ch in answer) >= 10 and footer.startswith("demo · ")
    assert stream_text(outputs_of(notebook, "control.close()")).strip() == "refreshing: False"


def test_batch_jobs_notebook_gathers_background_results(kernel_env, tmp_path, monkeypatch):
    path = str(tmp_path / "batch-jobs.ipynb")
    monkeypatch.setenv("JPY_SESSION_NAME", path)
    notebook = run_notebook("batch-jobs.ipynb", tmp_path)
    assert stream_text(outputs_of(notebook, "from mlx_jupyter import Client")).strip() == \
        "8 jobs queued"
    [table] = markdown_texts(outputs_of(notebook, "from IPython.display import Markdown"))
    rows = table.splitlines()[2:]
    assert len(rows) == 8
    assert all(row.rstrip(" |").rsplit("| ", 1)[1] in ("stop", "length") for row in rows)
    history = kernel_env.get("mlx/api/requests", params={"notebook": path}).json()
    assert history["total"] == 8
    assert {row["status"] for row in history["requests"]} == {"completed"}
    assert sorted(row["priority"] for row in history["requests"]) == [0] * 6 + [5, 5]


def stored_id(notebook: nbformat.NotebookNode, source_start: str, index: int = 0) -> str:
    """The request id an %%mlx cell's answer recorded in its metadata."""
    cells = [c for c in notebook.cells if c.cell_type == "code"
             and c.source.startswith(source_start)]
    outputs = [o for o in cells[index].outputs if o.output_type == "display_data"]
    return outputs[-1].metadata["mlx_jupyter"]["request_id"]


def stream_text(outputs: list) -> str:
    return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")


def html_texts(outputs: list) -> str:
    return "".join(o["data"].get("text/html", "") for o in outputs
                   if o.output_type in ("display_data", "execute_result"))


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


def test_interrupting_the_kernel_cancels_the_request_on_the_server(kernel_env, tmp_path):
    from jupyter_client.manager import start_new_kernel

    notebook = str(tmp_path / "interrupted.ipynb")
    worker = kernel_env.get("mlx/api/models/demo").json()
    if worker["status"] != "loaded":
        httpx.post(kernel_env.url + "mlx/api/models/demo/load", timeout=120,
                   headers={"Authorization": f"token {kernel_env.token}"}).raise_for_status()
        worker = kernel_env.get("mlx/api/models/demo").json()
    manager, kernel = start_new_kernel(kernel_name="python3",
                                       env={**os.environ, "JPY_SESSION_NAME": notebook})
    try:
        kernel.execute_interactive("%load_ext mlx_jupyter", timeout=60)
        os.kill(worker["pid"], signal.SIGSTOP)  # the request stays running until we let go
        try:
            msg_id = kernel.execute("%%mlx demo --max-tokens 4000\nTell a long story.")
            deadline = time.monotonic() + 60
            while not (running := kernel_env.get(
                    "mlx/api/requests", params={"notebook": notebook, "status": "running"}
                    ).json()["requests"]):
                assert time.monotonic() < deadline, "the cell's request never started"
                time.sleep(0.1)
            # The stream's headers, with the request id, follow the running status at once;
            # a busy machine may still need a moment to hand them to the kernel.
            time.sleep(0.5)
            manager.interrupt_kernel()
            reply = kernel.get_shell_msg(timeout=60)
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        assert reply["content"]["status"] == "ok"  # the magic took the interrupt itself
        request_id = running[0]["id"]
        deadline = time.monotonic() + 30
        while kernel_env.get(f"mlx/api/requests/{request_id}").json()["status"] == "running":
            assert time.monotonic() < deadline, "the interrupt did not cancel the request"
            time.sleep(0.05)
        assert kernel_env.get(f"mlx/api/requests/{request_id}").json()["status"] == "cancelled"
        # The cell's output says it was cancelled, and which request it was.
        footers = []
        while True:
            msg = kernel.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "display_data":
                footers.append(msg["content"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        assert footers[-1]["data"]["text/plain"] == "demo · cancelled"
        made = footers[-1]["metadata"]["mlx_jupyter"]
        assert (made["request_id"], made["finish_reason"]) == (request_id, "cancelled")
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)


def test_schema_logprobs_and_reasoning_cells_in_a_real_kernel(kernel_env, tmp_path):
    """What a notebook shows: a Person from --schema, one shaded span per token of
    --logprobs (with its alternatives in the title), in a kernel nbclient runs."""
    cells = [
        "%load_ext mlx_jupyter",
        "import pydantic\n"
        "class Person(pydantic.BaseModel):\n"
        "    name: str = pydantic.Field(max_length=16)\n"
        "    age: int = pydantic.Field(ge=0, le=120)",
        "%%mlx demo --schema Person -o who --max-tokens 60 --temperature 0\n"
        "Invent a person: a name and an age.",
        "print(type(who).__name__, isinstance(who, Person))",
        "%%mlx demo --logprobs --top-logprobs 3 --max-tokens 12 --temperature 0\nThe sea",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    for cell in notebook.cells:
        assert not [o for o in cell.outputs if o.output_type == "stream"
                    and o.name == "stderr"], cell.source

    schema_cell = notebook.cells[2].outputs
    answer = [o for o in schema_cell if o.output_type == "display_data"][-2]
    assert answer["data"]["text/markdown"].startswith("```json\n{")
    shown = json.loads(answer["data"]["text/plain"])
    assert set(shown) == {"name", "age"} and answer.metadata["mlx_jupyter"]["schema"] == \
        "Person"
    assert stream_text(notebook.cells[3].outputs) == "Person True\n"

    logprobs_cell = [o for o in notebook.cells[4].outputs if o.output_type == "display_data"]
    view, footer = logprobs_cell[-2], logprobs_cell[-1]
    tokens = view.metadata["mlx_jupyter"]["usage"]["completion_tokens"]
    markup = view["data"]["text/html"]
    spans = re.findall(r"<span class='mlx-token' data-p='([0-9.]+)' title='([^']*)'", markup)
    assert len(spans) == tokens == markup.count("<span ") and tokens >= 1
    assert all(0 < float(p) <= 1 for p, _ in spans)
    assert all(title.count("\n") == 4 for _, title in spans)  # itself, "top:", 3 rivals
    # The spans spell the answer (the first token may keep a space the text drops).
    spelled, text = html.unescape(re.sub(r"<[^>]+>", "", markup)), view["data"]["text/plain"]
    assert text and spelled.endswith(text) and not spelled[:-len(text)].strip()
    assert "demo · " in footer["data"]["text/plain"]
