"""What the extension adds to a Jupyter server's start: starts with and without it, interleaved.

Each round starts `jupyter server` twice, once with the extension and once with it disabled
(`--ServerApp.jpserver_extensions=mlx_jupyter=False`), in alternating order so that neither
side always runs on a warmer machine. A start is timed from the launch until `GET /api/status`
answers 200 and, with the extension, until `GET mlx/api/status` does; then until the first
store-backed route (`GET mlx/api/requests`) answers, which waits for the database to be opened
and migrated in the background. Each mode keeps its own data folder across rounds, so after the
first round the database exists, as on a user's machine. Beside it: the import of
`mlx_jupyter.app` alone, in a fresh interpreter.

Both sides start from bytecode: pip compiled jupyter_server's modules when it installed them,
as it compiles ours from a wheel, but an editable checkout (and PYTHONDONTWRITEBYTECODE, set on
some machines) leaves ours as source to compile at every start (~35 ms here). So the bench
compiles the package first.

    .venv/bin/python benchmarks/bench_startup.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import compileall
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from _common import median, save, stop_process, table  # noqa: E402
from live_server import free_port  # noqa: E402

POLL_SECONDS = 0.005
TIMEOUT_SECONDS = 120.0
DISABLED = "--ServerApp.jpserver_extensions=mlx_jupyter=False"
IMPORT_APP = ("import time; began = time.perf_counter(); import mlx_jupyter.app; "
              "print(time.perf_counter() - began)")


def wait_for(client: httpx.Client, url: str, process: subprocess.Popen, began: float) -> float:
    """Seconds from `began` until `url` answers 200."""
    deadline = began + TIMEOUT_SECONDS
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {process.returncode}")
        try:
            if client.get(url).status_code == 200:
                return time.perf_counter() - began
        except httpx.TransportError:
            pass
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"{url} did not answer within {TIMEOUT_SECONDS} s")


def start_once(folder: Path, with_extension: bool) -> dict[str, float]:
    """One start: the seconds until each route first answers 200."""
    token, port = secrets.token_hex(16), free_port()
    (folder / "notebooks").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
           "JUPYTER_DATA_DIR": str(folder / "data"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={folder / 'notebooks'}",
               *(() if with_extension else (DISABLED,))]
    base = f"http://127.0.0.1:{port}/"
    with open(folder / "server.log", "ab") as log, \
            httpx.Client(headers={"Authorization": f"token {token}"}, timeout=30) as client:
        began = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            times = {"server": wait_for(client, base + "api/status", process, began)}
            if with_extension:
                times["extension"] = wait_for(client, base + "mlx/api/status", process, began)
                times["store"] = wait_for(client, base + "mlx/api/requests", process, began)
            elif client.get(base + "mlx/api/status").status_code != 404:
                raise RuntimeError(f"the extension is still enabled with {DISABLED}")
        finally:
            stop_process(process)
    return times


def import_seconds() -> float:
    result = subprocess.run([sys.executable, "-c", IMPORT_APP], check=True,
                            capture_output=True, text=True)
    return float(result.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="starts of each kind")
    args = parser.parse_args()
    compileall.compile_dir(ROOT / "mlx_jupyter", quiet=1)

    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as scratch:
        folders = {True: Path(scratch) / "with", False: Path(scratch) / "without"}
        for number in range(args.rounds):
            order = (True, False) if number % 2 == 0 else (False, True)
            for with_extension in order:
                runs[with_extension].append(start_once(folders[with_extension],
                                                       with_extension))
            print(f"round {number + 1}/{args.rounds}: "
                  + ", ".join(f"{'with' if mode else 'without'} "
                              f"{runs[mode][-1].get('extension', runs[mode][-1]['server']):.3f} s"
                              for mode in order), flush=True)
    imports = [import_seconds() for _ in range(args.rounds)]

    def median_ms(mode: bool, key: str) -> float:
        return median([run[key] for run in runs[mode]]) * 1000

    without = median_ms(False, "server")
    with_server, with_extension = median_ms(True, "server"), median_ms(True, "extension")
    rows = [
        ["without the extension: GET /api/status", without, ""],
        ["with it: GET /api/status", with_server, with_server - without],
        ["with it: GET mlx/api/status", with_extension, with_extension - without],
        ["with it: GET mlx/api/requests (the database open and migrated)",
         median_ms(True, "store"), median_ms(True, "store") - without],
        ["import mlx_jupyter.app alone (fresh interpreter)", median(imports) * 1000, ""],
    ]
    body = (f"Median of {args.rounds} interleaved starts of each kind, from the launch of "
            "`jupyter server` until the route answers 200; the added time is against the "
            "start without the extension.\n\n"
            + table(["until", "median ms", "added ms"], rows))
    command = ".venv/bin/python benchmarks/bench_startup.py" + "".join(
        f" {arg}" for arg in sys.argv[1:])
    save("startup", "Start-up: a Jupyter server with and without the extension", body, command)


if __name__ == "__main__":
    main()
