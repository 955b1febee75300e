"""The store seen from the event loop: writes behind, in order, read back consistently."""

import asyncio
import threading

import pytest

from mlx_jupyter.services import BlockingPool, HistoryCleanup, StoreService, WriteBehind
from mlx_jupyter.store import RequestRecord, RequestStatus

pytest_plugins = ["store_fixtures"]


@pytest.fixture
def pool():
    pool = BlockingPool(4)
    yield pool
    pool.shutdown()


def test_writes_run_in_call_order_in_batches_and_a_failure_stops_nothing(pool):
    done: list[int] = []
    gate = threading.Event()

    def write(n: int) -> int:
        if n == 0:
            gate.wait(10)  # holds the first batch so that the next writes pile up behind it
        if n == 3:
            raise ValueError("write 3 fails")
        done.append(n)
        return n * 10

    async def main():
        writes = WriteBehind(pool)
        futures = [writes.write(write, 0)]
        await asyncio.sleep(0.05)  # the first batch (write 0) is on the pool, waiting
        futures += [writes.write(write, n) for n in range(1, 6)]
        gate.set()
        await writes.settled()
        return futures

    futures = asyncio.run(main())
    assert done == [0, 1, 2, 4, 5]
    assert [f.result() for i, f in enumerate(futures) if i != 3] == [0, 10, 20, 40, 50]
    with pytest.raises(ValueError, match="write 3 fails"):
        futures[3].result()


def test_a_request_written_behind_is_read_back_at_once(store, pool):
    store.ensure_model("demo", "/models/demo", "bundled", "text")
    service = StoreService(store, pool)

    async def main():
        record = RequestRecord(model="demo", prompt="hi", status=RequestStatus.QUEUED)
        service.add_request(record)  # not awaited: the next read must still see it
        service.update_request(record.id, status=RequestStatus.RUNNING)
        service.update_request(record.id, status=RequestStatus.COMPLETED, output_text="hello")
        row = await service.get_request(record.id)
        rows, total = await service.list_requests(model="demo")
        return row, rows, total

    row, rows, total = asyncio.run(main())
    assert row["status"] == "completed" and row["output_text"] == "hello"
    assert total == 1 and rows[0]["id"] == row["id"]
    assert store.get_model("demo")["use_count"] == 1


def test_the_history_cleanup_applies_the_settings_and_interval_0_never_runs(store, pool):
    """HistoryCleanup on a real database: with an interval it prunes by the settings at once
    and again later; with 0 (c.MlxApp.cleanup_interval_seconds = 0) it never runs."""
    store.ensure_model("demo", "/x", "bundled")
    ids = [store.add_request(RequestRecord(model="demo", prompt=str(i),
                                           status=RequestStatus.COMPLETED.value))
           for i in range(4)]
    store.settings.set("max_history_rows", 1)

    async def run(interval: float) -> int:
        service = StoreService(store, pool)
        cleanup = HistoryCleanup(service, interval)
        cleanup.start()
        await asyncio.sleep(0.2)  # the first pass runs at once; later ones every interval
        await cleanup.stop()
        await service.flush()  # a pass queued before the stop has run
        return store.list_requests()[1]

    assert asyncio.run(run(0)) == 4  # never
    assert asyncio.run(run(0.05)) == 1  # the newest stays
    assert store.list_requests()[0][0]["id"] == ids[-1]
