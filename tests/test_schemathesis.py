"""The OpenAPI document is exact: schemathesis, a fuzzing client no one here wrote, runs every
operation of mlx/api/openapi.json against a live server with the demo model, with all its
checks and phases, a fixed seed and 50 examples an operation, and finds nothing.

What keeps it short is the server's own configuration, not the fuzzer's: a KV reservation of
16 tokens a batch slot (8 × 16 = 128 positions) refuses with a 409 any request that could not
end fast, and a default_max_tokens of 16 keeps the requests that name no max_tokens short. The
fuzzer may change that setting (it may change every setting): it is a route like the others.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from live_server import start_server, stop_server

SEED = 20260101
EXAMPLES = 50
HERE = Path(__file__).parent


def test_schemathesis_finds_no_difference_between_the_document_and_the_server(tmp_path):
    server = start_server(tmp_path, tmp_path / "server.log",
                          args=("--MlxApp.kv_reserve_tokens=16",))
    auth = {"Authorization": f"token {server.token}"}
    try:
        assert httpx.put(server.url + "mlx/api/settings/default_max_tokens", headers=auth,
                         json={"value": 16}, timeout=30).status_code == 200
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli",
             "--config-file", str(HERE / "schemathesis.toml"), "run",
             server.url + "mlx/api/openapi.json", "--checks", "all",
             "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
             "--request-timeout", "120", "--header", f"Authorization: token {server.token}",
             "--no-color"],
            # The hooks teach it to read NDJSON answers, so streams are checked too.
            env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                 "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])},
            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    finally:
        stop_server(server)
    report = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, report
    assert " passed" in run.stdout and "failed" not in run.stdout, report
