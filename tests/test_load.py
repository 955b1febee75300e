"""Load: 8 clients send a mix of streams, whole answers, OpenAI chats, cancellations, background
jobs and polls at once to one live server (tests/load_mix.py); nothing answers a 5xx, SQLite's
lock never shows, and every generation ends in the history in a final state.

The full 8 × 100 runs in benchmarks/bench_load.py; here 8 × 25 keep it well under a minute.
"""

from __future__ import annotations

import pytest

from live_server import start_server, stop_server
from load_mix import LOCKED, run_load

CLIENTS, PER_CLIENT = 8, 25
# Two requests at once for the model, so that the clients' requests really wait in the queue
# and the low-priority jobs are cancelled while they are queued.
BATCH_SIZE = 2


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """A server of its own (its log is read afterwards), and the report of the load on it."""
    root = tmp_path_factory.mktemp("load-server")
    log = root / "server.log"
    server = start_server(root, log, args=(f"--MlxApp.max_batch_size={BATCH_SIZE}",))
    try:
        report = run_load(server, CLIENTS, PER_CLIENT, seed=15)
        queue = server.get("mlx/api/queue").json()
    finally:
        stop_server(server)
    return report, queue, log.read_text(errors="replace")


def test_no_answer_is_a_5xx_or_unexpected(loaded):
    report, _, _ = loaded
    assert len(report.answers) == CLIENTS * PER_CLIENT
    assert report.server_errors == []
    assert [(a.kind, a.codes, a.text[:300]) for a in report.answers if a.unexpected] == []


def test_the_database_is_never_locked(loaded):
    report, _, log = loaded
    assert report.locked == []
    assert LOCKED not in log.lower()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


def test_every_generation_ends_in_the_history_with_its_final_state(loaded):
    report, queue, _ = loaded
    assert len(report.generation_ids) > CLIENTS * PER_CLIENT / 2  # the mix is mostly them
    assert report.not_final() == {}
    assert report.failed_without_reason() == []
    assert queue["queued"] == 0 and queue["models"] == {}


def test_cancellations_of_running_and_queued_requests_end_cancelled(loaded):
    report, _, _ = loaded
    cancelled = [a for a in report.answers if a.cancel_was in ("queued", "active")]
    # The low-priority jobs wait behind the other clients' requests; the streams were cancelled
    # after their first text. Either may end before its DELETE arrives (a 409), not all of them.
    assert {"queued", "active"} <= {a.cancel_was for a in cancelled}
    for answer in cancelled:
        row = report.history[answer.request_id]
        if answer.cancel_was == "queued":
            assert row["status"] == "cancelled", row
        else:  # a running one stops at its next step, or had just made its last token
            assert row["status"] in ("cancelled", "completed"), row
