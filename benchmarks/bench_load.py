"""Load: 8 clients × 100 mixed requests against one live server, and what came back.

The mix of tests/test_load.py (tests/load_mix.py) at full size: native streams and whole answers,
OpenAI chats (the official SDK, streamed and whole), streams cancelled once running, low-priority
background jobs cancelled while queued, background jobs, and polls of the status, the queue, the
history and one request, on the demo model. It prints and saves: requests by kind with their
latency, answers by status code, 5xx and "database is locked" counts (answers and the server's
log), the history's final state of every generation, and the total time. One request before
them loads the model.

    .venv/bin/python benchmarks/bench_load.py [--clients 8] [--requests 100] [--batch-size 2]

The database is SQLite, or PostgreSQL with MLX_TEST_DATABASE=postgresql (tests/live_server.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import save, table  # noqa: E402
from live_server import database_kind, start_server, stop_server  # noqa: E402
from load_mix import LOCKED, MIX, MODEL, LoadReport, run_load  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def kinds_table(report: LoadReport) -> str:
    rows = []
    for kind in MIX:
        answers = [a for a in report.answers if a.kind == kind]
        ms = [a.seconds * 1000 for a in answers]
        codes = Counter(code for a in answers for code in a.codes)
        was = Counter(a.cancel_was for a in answers if a.cancel_was)
        rows.append([kind, len(answers), percentile(ms, 50), percentile(ms, 95),
                     ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())),
                     ", ".join(f"{state}: {n}" for state, n in sorted(was.items())) or "—"])
    return table(["kind", "requests", "p50 ms", "p95 ms", "answers by status code",
                  "cancelled while"], rows)


def summary_table(report: LoadReport, log: str, clients: int, per_client: int,
                  batch_size: int) -> str:
    statuses = report.statuses()
    return table(["figure", "value"], [
        ["clients × requests", f"{clients} × {per_client}"],
        ["database", database_kind()],
        ["max_batch_size", batch_size],
        ["seconds until the clients were done", report.seconds],
        ["seconds until the history was final", report.settled_seconds],
        ["requests/s", len(report.answers) / report.seconds],
        ["answers by status code", ", ".join(f"{code}: {n}" for code, n in
                                             sorted(report.codes().items()))],
        ["5xx answers", len(report.server_errors)],
        ["unexpected answers", sum(1 for a in report.answers if a.unexpected)],
        ['"database is locked" in answers', len(report.locked)],
        ['"database is locked" in the server log', log.lower().count(LOCKED)],
        ["tracebacks in the server log", log.count("Traceback")],
        ["generations", len(report.generation_ids)],
        ["history rows by final state", ", ".join(f"{status}: {n}" for status, n in
                                                  sorted(statuses.items()))],
        ["not final (or missing) after the load", len(report.not_final())],
        ["failed without a reason", len(report.failed_without_reason())],
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="per client")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="c.MlxApp.max_batch_size: 2 makes requests wait in the queue")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        log_path = root / "server.log"
        server = start_server(root, log_path,
                              args=(f"--MlxApp.max_batch_size={args.batch_size}",))
        try:
            # One request first: its model's load is no part of the load's latencies.
            server.request("POST", "mlx/api/generate", json={
                "model": MODEL, "prompt": "warm-up", "max_tokens": 1}).raise_for_status()
            report = run_load(server, args.clients, args.requests, seed=args.seed,
                              max_tokens=args.max_tokens)
        finally:
            stop_server(server)
        log = log_path.read_text(errors="replace")
    body = (summary_table(report, log, args.clients, args.requests, args.batch_size) + "\n\n"
            + kinds_table(report))
    save("load", "Load: mixed requests from concurrent clients", body,
         "python benchmarks/bench_load.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
