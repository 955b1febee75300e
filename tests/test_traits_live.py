"""The traits of the README's configuration table and the stored settings, each set to a value
other than its default on a running server, and seen taking effect in what the server does.

Live servers (their own process, tests/live_server.py) where the effect is in the workers, the
log or the environment; pytest-jupyter's in-process server where it is inside the server (its
thread pool, its database pool). Traits that do not interfere share a server. Traits tested
this way elsewhere: max_batch_size and max_queued_requests (test_queue.py), prompt_cache_bytes,
kv_reserve_tokens and worker_base_memory (test_memory_live.py), model_dirs, allowed_model_roots
and scan_huggingface_cache=False (test_models_api.py), cleanup_interval_seconds with the settings
history_retention_days and max_history_rows (test_history_cleanup.py), default_max_tokens
(test_history_api.py); database_url runs the whole server suite on PostgreSQL (conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from live_server import LiveServer, postgres_database_url, start_server, stop_server
from mlx_jupyter.app import MlxApp
from mlx_jupyter.models.registry import DEMO_MODEL_PATH
from mlx_jupyter.store.settings import SETTINGS
from model_factory import make_hf_cache_repo, make_model
from unavailable import unavailable

OPENBLAS = MlxApp.openblas_library.default_value
EXTENSION = {"jpserver_extensions": {"mlx_jupyter": True}}
SQLITE = []  # jp_argv for a test about SQLite itself: the server's default database
PROMPT = {"prompt": "The sea", "max_tokens": 2, "temperature": 0}


def wait_until(check, what: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.1)
    return result


# -- live servers ---------------------------------------------------------------------------



def generate(live: LiveServer, model: str = "demo") -> dict:
    answer = live.request("POST", "mlx/api/generate", json={"model": model, **PROMPT})
    assert answer.status_code == 200, answer.text
    return answer.json()


def loaded(live: LiveServer) -> dict[str, dict]:
    return {m["name"]: m for m in live.request("GET", "mlx/api/status").json()["models"]["loaded"]}


def log_of(path: Path) -> str:
    return path.read_text(errors="replace")


def mapped_files(pid: int) -> set[str]:
    """The files a process has mapped: its executable and every shared library it loaded."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split()) == 6}


def environment(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        pairs = [item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item]
    return {key.decode(): value.decode(errors="replace") for key, value in pairs}


def debian_openblas() -> str:
    """The file the default openblas_library names (a link), as a process's maps list it."""
    if not Path(OPENBLAS).is_file():
        unavailable(f"needs Debian's OpenBLAS at {OPENBLAS} (apt-get install "
                    "libopenblas0-pthread, or make system-deps)")
    return os.path.realpath(OPENBLAS)


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory) -> Path:
    """A model_dirs folder with `twin`, a copy of the demo model: a second model to load."""
    models = tmp_path_factory.mktemp("model-dirs")
    shutil.copytree(DEMO_MODEL_PATH, models / "twin")
    return models


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, twin_dir):
    """A server with blas_threads=2, max_loaded_models=1, memory_overheads text=3,
    memory_estimate_ttl=0, and a Hugging Face cache to scan (scan_huggingface_cache's default)."""
    root = tmp_path_factory.mktemp("tuned")
    make_model(twin_dir / "reshaped", layers=2)  # never loaded: its config changes under it
    hf_cache = root / "hf-cache"
    make_hf_cache_repo(hf_cache, "someone/tiny-mlx", make_model(root / "tiny").path)
    server = start_server(root, root / "server.log", env={"HF_HUB_CACHE": str(hf_cache)}, args=(
        "--MlxApp.blas_threads=2", "--MlxApp.max_loaded_models=1",
        "--MlxApp.memory_overheads=text=3.0", "--MlxApp.memory_estimate_ttl=0",
        f"--MlxApp.model_dirs={twin_dir}"))
    yield server
    stop_server(server)


def test_workers_preload_openblas_with_blas_threads_threads(tuned):
    library = debian_openblas()
    generate(tuned)
    pid = loaded(tuned)["demo"]["pid"]
    assert library in mapped_files(pid)  # preload_openblas (default True): it is loaded
    env = environment(pid)
    assert env["LD_PRELOAD"].split()[0] == OPENBLAS
    # The demo is small enough to get one thread by default; blas_threads=2 gives it two.
    assert env["OPENBLAS_NUM_THREADS"] == "2"


def test_max_loaded_models_1_unloads_one_model_to_load_another(tuned):
    generate(tuned, "demo")
    assert set(loaded(tuned)) == {"demo"}
    generate(tuned, "twin")
    assert set(loaded(tuned)) == {"twin"}
    assert tuned.request("GET", "mlx/api/models/demo").json()["status"] == "unloaded"


def test_memory_overheads_scale_the_estimate(tuned):
    model = tuned.request("GET", "mlx/api/models/reshaped").json()
    assert model["overhead"] == 3.0
    assert model["estimate_bytes"] == int(model["weight_bytes"] * 3.0)


def test_memory_estimate_ttl_0_recomputes_the_estimate_at_each_look(tuned, twin_dir):
    before = tuned.request("GET", "mlx/api/models/reshaped").json()["kv_bytes_per_token"]
    # Twice the layers, written in place with the same size and times: nothing the estimate's
    # fingerprint sees changes, so only an expired cache entry shows the new figure.
    config = twin_dir / "reshaped" / "config.json"
    stat, text = config.stat(), config.read_text()
    reshaped = text.replace('"num_hidden_layers": 2', '"num_hidden_layers": 4')
    assert reshaped != text and len(reshaped) == len(text)
    with open(config, "r+") as file:
        file.write(reshaped)
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = tuned.request("GET", "mlx/api/models/reshaped").json()["kv_bytes_per_token"]
    assert after == 2 * before


def test_settings_are_the_defaults_of_a_request_that_leaves_them_out(tuned):
    changed = {"default_model": "twin", "default_temperature": 0.7, "default_top_p": 0.5}
    for key, value in changed.items():
        assert tuned.request("PUT", f"mlx/api/settings/{key}", json={"value": value}).is_success
    try:
        answer = tuned.request("POST", "mlx/api/generate",
                      json={"prompt": "The sea", "max_tokens": 2}).json()
        row = tuned.request("GET", f"mlx/api/requests/{answer['request_id']}").json()
        assert answer["model"] == row["model"] == "twin"
        assert row["parameters"]["temperature"] == 0.7 and row["parameters"]["top_p"] == 0.5
    finally:
        for key in changed:
            tuned.request("PUT", f"mlx/api/settings/{key}", json={"value": SETTINGS[key].default})


def test_models_in_the_hugging_face_cache_are_listed(tuned):
    models = {m["name"]: m for m in tuned.request("GET", "mlx/api/models").json()["models"]}
    assert models["someone/tiny-mlx"]["source"] == "huggingface"
    assert models["someone/tiny-mlx"]["repo_id"] == "someone/tiny-mlx"


@pytest.fixture(scope="module")
def plain(tmp_path_factory, twin_dir):
    """A server with preload_openblas=False and a memory budget that holds one demo only."""
    root = tmp_path_factory.mktemp("plain")
    server = start_server(root, root / "server.log", args=(
        "--MlxApp.preload_openblas=False", "--MlxApp.memory_budget=750MB",
        f"--MlxApp.model_dirs={twin_dir}", "--MlxApp.scan_huggingface_cache=False"))
    yield server, root / "server.log"
    stop_server(server)


def test_without_preload_openblas_workers_keep_mlxs_own_blas(plain):
    server, log = plain
    library = debian_openblas()
    generate(server)
    pid = loaded(server)["demo"]["pid"]
    assert library not in mapped_files(pid)
    assert OPENBLAS not in environment(pid).get("LD_PRELOAD", "")
    assert "not found; model workers use mlx's bundled" not in log_of(log)  # asked, not missing


def test_the_memory_budget_is_reported_and_bounds_the_loaded_models(plain):
    server, _ = plain
    assert server.request("GET", "mlx/api/status").json()["memory"]["budget"] == 750_000_000
    footprint = server.request("GET", "mlx/api/models/twin").json()["budget_bytes"]
    assert footprint < 750_000_000 < 2 * footprint  # one fits, two do not
    generate(server, "demo")
    generate(server, "twin")  # max_loaded_models is 3: only the budget makes room
    assert set(loaded(server)) == {"twin"}


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory):
    """A server whose openblas_library is missing, with worker_stop_timeout=0 and
    idle_unload_seconds=1."""
    root = tmp_path_factory.mktemp("short-lived")
    missing = root / "nowhere" / "libopenblas.so.0"
    server = start_server(root, root / "server.log", args=(
        f"--MlxApp.openblas_library={missing}", "--MlxApp.worker_stop_timeout=0",
        "--MlxApp.idle_unload_seconds=1", "--MlxApp.scan_huggingface_cache=False"))
    yield server, root / "server.log", str(missing)
    stop_server(server)


def test_a_missing_openblas_library_is_reported_and_workers_start_without_it(short_lived):
    server, log, missing = short_lived
    assert f"{missing} not found; model workers use mlx's bundled" in log_of(log)
    assert server.request("POST", "mlx/api/models/demo/pin", json={}).json()["pinned"]
    try:  # pinned: the idle unload leaves it alone while we look
        generate(server)
        pid = loaded(server)["demo"]["pid"]
        assert not any("libopenblas" in name and "numpy" not in name
                       for name in mapped_files(pid))
        assert missing not in environment(pid).get("LD_PRELOAD", "")
    finally:
        server.request("POST", "mlx/api/models/demo/unpin", json={})


def test_idle_workers_unload_by_themselves_and_a_stop_timeout_of_0_kills_them(short_lived):
    server, log, _ = short_lived
    generate(server)
    pid = wait_until(lambda: loaded(server).get("demo", {}).get("pid"), "a demo worker")
    wait_until(lambda: "demo" not in loaded(server), "the idle unload")
    text = wait_until(lambda: "unloaded (idle" in (t := log_of(log)) and t,
                      "the idle unload's log line")
    # worker_stop_timeout=0: no time to exit by itself, so it is killed at once.
    assert f"worker pid {pid} for demo ignored shutdown; killing it" in text
    assert not Path(f"/proc/{pid}").exists()


def test_a_worker_start_timeout_too_short_for_any_load_is_a_503(tmp_path):
    server = start_server(tmp_path, tmp_path / "server.log",
                          args=("--MlxApp.worker_start_timeout=0.001",))
    try:
        answer = server.request("POST", "mlx/api/generate", json={"model": "demo", **PROMPT})
        assert answer.status_code == 503
        assert answer.json()["message"] == "model 'demo' did not load within 0.001 s"
        assert loaded(server) == {}
    finally:
        stop_server(server)


# -- in-process servers (pytest-jupyter) ----------------------------------------------------

async def api(jp_fetch, *path, method="GET", body=None):
    response = await jp_fetch("mlx", "api", *path, method=method, request_timeout=120,
                              body=None if body is None else json.dumps(body))
    return json.loads(response.body)


def extension(jp_serverapp) -> MlxApp:
    [app] = jp_serverapp.extension_manager.extension_apps["mlx_jupyter"]
    return app


@pytest.mark.parametrize("jp_argv", [SQLITE])
@pytest.mark.parametrize("jp_server_config", [{"ServerApp": EXTENSION, "MlxApp": {
    "thread_pool_workers": 3, "db_pool_size": 3, "db_max_overflow": 1,
    "db_busy_timeout_ms": 1234}}])
async def test_the_thread_pool_and_database_pool_have_the_sizes_asked_for(jp_fetch, jp_serverapp):
    app = extension(jp_serverapp)
    info = await api(jp_fetch, "database")
    assert info["connection_pool_size"] == 3 and info["pragmas"]["busy_timeout"] == 1234

    # thread_pool_workers=3: blocking work runs on three threads, the rest waits for them.
    release, running = threading.Event(), []

    def hold() -> None:
        running.append(threading.current_thread().name)
        release.wait(30)

    jobs = [asyncio.ensure_future(app.pool.run(hold)) for _ in range(5)]
    try:
        while len(running) < 3:
            await asyncio.sleep(0.01)
        assert len({t.name for t in threading.enumerate()
                    if t.name.startswith("mlx-jupyter")}) == 3
    finally:
        release.set()
    await asyncio.gather(*jobs)
    assert len(running) == 5 and len(set(running)) == 3

    # db_pool_size=3 and db_max_overflow=1: a fifth connection waits for one of four.
    engine = (await jp_serverapp.web_app.settings["mlx_jupyter.store"].ready()).engine
    held = [engine.connect() for _ in range(4)]
    with ThreadPoolExecutor(1) as thread:
        fifth = thread.submit(engine.connect)
        await asyncio.sleep(0.5)
        assert not fifth.done()
        held.pop().close()
        fifth.result(30).close()
    for connection in held:
        connection.close()


@pytest.mark.parametrize("jp_argv", [SQLITE])
@pytest.mark.parametrize("jp_server_config", [{"ServerApp": EXTENSION,
                                               "MlxApp": {"settings_cache_ttl": 0}}])
async def test_settings_cache_ttl_0_sees_another_servers_write_at_once(jp_fetch):
    from mlx_jupyter.store import Store

    first = await api(jp_fetch, "generate", method="POST", body={"prompt": "The sea"})
    recorded = await api(jp_fetch, "requests", first["request_id"])
    assert recorded["parameters"]["max_tokens"] == 256  # the default, now in the cache
    url = (await api(jp_fetch, "database"))["url"]  # SQLite: nothing in it is masked
    with Store.open(url) as other:  # a second server on the same database
        other.settings.set("default_max_tokens", 3)
    second = await api(jp_fetch, "generate", method="POST", body={"prompt": "The sea"})
    recorded = await api(jp_fetch, "requests", second["request_id"])
    assert recorded["parameters"]["max_tokens"] == 3


@pytest.mark.parametrize("jp_server_config", [{"ServerApp": EXTENSION, "MlxApp": {
    "max_batch_size": 1, "priority_aging_seconds": 0.05}}])
async def test_priority_aging_seconds_lets_a_long_wait_pass_a_higher_priority(jp_fetch):
    body = {"model": "demo", **PROMPT}
    await api(jp_fetch, "generate", method="POST", body=body)  # loads the model
    [model] = (await api(jp_fetch, "status"))["models"]["loaded"]
    os.kill(model["pid"], signal.SIGSTOP)  # the one slot stays taken: the others queue
    try:
        requests = [asyncio.ensure_future(api(jp_fetch, "generate", method="POST", body=body))]
        for priority in (0, 5):
            await asyncio.sleep(1)  # the first waits 1 s (20 agings) before the second comes
            requests.append(asyncio.ensure_future(api(
                jp_fetch, "generate", method="POST", body={**body, "priority": priority})))
        for _ in range(600):
            queue = (await api(jp_fetch, "queue"))["models"].get("demo", {"queued": []})
            if len(queue["queued"]) == 2:
                break
            await asyncio.sleep(0.05)
        # Priority 0 after a second of waiting stands above a new priority 5 (at the
        # default of 30 s per level it would take 150 s).
        assert [r["priority"] for r in queue["queued"]] == [0, 5]
    finally:
        os.kill(model["pid"], signal.SIGCONT)
    await asyncio.gather(*requests)


# -- the database's connection pool, on PostgreSQL ------------------------------------------

def own_postgres_url(name: str) -> str:
    """A new database on the private PostgreSQL server whose connections carry `name`, so
    that pg_stat_activity tells the server's connections from any other."""
    return f"{postgres_database_url(name)}&application_name={name}"


def backends(url: str, *, terminate: bool = False) -> set[int]:
    """The server processes of the connections made with `url` (terminated, with terminate)."""
    import psycopg
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    query = ("SELECT pid, pg_terminate_backend(pid)" if terminate else "SELECT pid") + \
        " FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()"
    with psycopg.connect(host=parts.host, port=parts.port, user=parts.username,
                         password=parts.password, dbname=parts.database,
                         autocommit=True) as connection:
        rows = connection.execute(query, (parts.query["application_name"],)).fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize("pre_ping", [True, False])
def test_db_pool_pre_ping_decides_whether_a_dropped_connection_fails_a_request(tmp_path,
                                                                              pre_ping):
    url = own_postgres_url(f"pre_ping_{pre_ping}".lower())
    server = start_server(tmp_path, tmp_path / "server.log", args=(
        f"--MlxApp.database_url={url}", f"--MlxApp.db_pool_pre_ping={pre_ping}",
        "--MlxApp.cleanup_interval_seconds=0"))  # no pass of its own takes the connection
    try:
        assert server.request("GET", "mlx/api/database").json()["dialect"] == "postgresql"
        assert server.request("GET", "mlx/api/requests").status_code == 200
        assert backends(url, terminate=True)  # as a restarted database server would
        first = server.request("GET", "mlx/api/requests")
        # Checked before use, a dead connection is replaced; unchecked, it fails a request,
        # as a database that stopped answering (503, saying so).
        assert first.status_code == (200 if pre_ping else 503), first.text
        if not pre_ping:
            assert first.json()["reason"] == "DatabaseNotAnswering"
        assert server.request("GET", "mlx/api/requests").status_code == 200  # and then it is
    finally:
        stop_server(server)


def test_db_pool_recycle_0_replaces_a_connection_at_each_use(tmp_path):
    url = own_postgres_url("recycle_0")
    server = start_server(tmp_path, tmp_path / "server.log", args=(
        f"--MlxApp.database_url={url}", "--MlxApp.db_pool_recycle=0",
        "--MlxApp.cleanup_interval_seconds=0"))
    try:
        assert server.request("GET", "mlx/api/requests").status_code == 200
        first = backends(url)
        assert first
        for _ in range(5):
            assert server.request("GET", "mlx/api/requests").status_code == 200
        # Every connection the pool held was older than 0 s when next used, so closed.
        wait_until(lambda: not first & backends(url), "the first connections closing", 30)
    finally:
        stop_server(server)
