"""The store seen from the event loop: opened in the background with calls waiting for it,
writes behind, in order, read back consistently; a store that cannot open answers 503."""

import asyncio
import threading

import pytest
from store_fixtures import nothing_to_prepare

from mlx_jupyter.services import (
    BlockingPool,
    HistoryCleanup,
    StoreService,
    StoreUnavailable,
    WriteBehind,
)
from mlx_jupyter.store import RequestRecord, RequestStatus

pytest_plugins = ["store_fixtures"]


async def opened(store, pool) -> StoreService:
    service = StoreService(pool)
    assert await service.open(lambda: store, nothing_to_prepare)
    return service


class TripCountingPool(BlockingPool):
    """The real pool, counting the trips made to it."""

    trips = 0

    async def run(self, function, /, *args, **kwargs):
        self.trips += 1
        return await super().run(function, *args, **kwargs)


def test_writes_run_in_call_order_in_batches_and_a_failure_stops_nothing():
    done: list[int] = []
    started, gate = threading.Event(), threading.Event()
    pool = TripCountingPool(4)

    def write(n: int) -> int:
        if n == 0:
            started.set()
            gate.wait(10)  # holds the first batch so that the next writes pile up behind it
        if n == 3:
            raise ValueError("write 3 fails")
        done.append(n)
        return n * 10

    async def target() -> str:
        return "the target"

    async def main():
        writes = WriteBehind(pool, target)
        futures = [writes.write(lambda target: write(0))]
        while not started.is_set():  # the first batch (write 0 alone) is on the pool
            await asyncio.sleep(0.01)
        futures += [writes.write(lambda target, n=n: write(n)) for n in range(1, 6)]
        futures.append(writes.write(lambda target: target))
        gate.set()
        await writes.settled()
        return futures

    futures = asyncio.run(main())
    pool.shutdown()
    assert pool.trips == 2  # write 0, then the six queued behind it in one batch
    assert done == [0, 1, 2, 4, 5]
    assert [f.result() for i, f in enumerate(futures) if i != 3] == \
        [0, 10, 20, 40, 50, "the target"]
    with pytest.raises(ValueError, match="write 3 fails"):
        futures[3].result()


def test_a_request_written_behind_is_read_back_at_once(store, pool):
    store.ensure_model("demo", "/models/demo", "bundled", "text")

    async def main():
        service = await opened(store, pool)
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


def test_calls_made_before_the_store_opens_wait_and_see_what_start_up_prepared(store, pool):
    """Reads and writes that come before `open` (a request right after the server's start)
    are answered once it has run, after the start-up steps: they see what those wrote."""
    store.ensure_model("demo", "/models/demo", "bundled", "text")
    steps: list[str] = []

    async def main():
        service = StoreService(pool)
        record = RequestRecord(model="demo", prompt="early", status=RequestStatus.QUEUED)
        written = service.add_request(record)
        reads = asyncio.gather(service.setting("default_max_tokens"),
                               service.get_request(record.id), service.list_models())
        await asyncio.sleep(0.05)
        assert not written.done() and not reads.done()  # nothing runs before the store opens
        steps.append(service.state().state)

        async def prepare(ready_store) -> None:
            steps.append("prepare")
            steps.append(service.state().state)  # open, not yet prepared
            await asyncio.sleep(0.05)  # the early calls still wait
            ready_store.settings.set("default_max_tokens", 99)

        def connect():
            steps.append("connect")
            return store

        assert await service.open(connect, prepare)
        steps.append(service.state().state)
        await written
        return await reads

    setting, row, models = asyncio.run(main())
    assert steps == ["opening", "connect", "prepare", "opening", "ready"]
    assert setting["value"] == 99  # written by the start-up step, before the reads ran
    assert row["prompt"] == "early" and row["status"] == "queued"
    assert [model["name"] for model in models] == ["demo"]


def test_a_store_that_cannot_open_fails_every_call_with_its_reason(pool, caplog):
    reason = "the database sqlite:///nowhere could not be opened: no; check c.MlxApp.database_url"

    def connect():
        raise StoreUnavailable(reason)

    async def main():
        service = StoreService(pool)
        early_write = service.add_request(RequestRecord(model="demo", prompt="x"))
        early_read = asyncio.ensure_future(service.list_requests())
        assert not await service.open(connect, nothing_to_prepare)
        outcomes = await asyncio.gather(
            early_read, early_write, service.settings(), service.setting_values(),
            service.get_model("demo"), service.database_info(), service.prune_history(),
            return_exceptions=True)
        await service.flush()  # the failed writes count as settled: nothing hangs
        service.close()  # nothing to close
        return outcomes, service.state()

    outcomes, state = asyncio.run(main())
    assert (state.state, state.error) == ("unavailable", reason)
    assert all(isinstance(outcome, StoreUnavailable) and str(outcome) == reason
               for outcome in outcomes), outcomes
    assert StoreUnavailable.status == 503
    [logged] = [r for r in caplog.records if r.name == "mlx_jupyter.services"]
    assert logged.levelname == "ERROR" and reason in logged.getMessage()
    assert "answer 503" in logged.getMessage()


def test_a_start_up_step_that_fails_makes_the_store_unavailable_naming_it(store, pool):
    async def prepare(_store) -> None:
        raise RuntimeError("recovery broke\nSQL: SELECT ...")

    async def main():
        service = StoreService(pool)
        assert not await service.open(lambda: store, prepare)
        with pytest.raises(StoreUnavailable) as raised:
            await service.list_models()
        return str(raised.value)

    assert asyncio.run(main()) == "the database could not be prepared: recovery broke"


def test_the_history_cleanup_applies_the_settings_and_interval_0_never_runs(store, pool):
    """HistoryCleanup on a real database: with an interval it prunes by the settings at once
    and again later; with 0 (c.MlxApp.cleanup_interval_seconds = 0) it never runs."""
    store.ensure_model("demo", "/x", "bundled")
    ids = [store.add_request(RequestRecord(model="demo", prompt=str(i),
                                           status=RequestStatus.COMPLETED.value))
           for i in range(4)]
    store.settings.set("max_history_rows", 1)

    async def run(interval: float) -> int:
        service = await opened(store, pool)
        cleanup = HistoryCleanup(service, interval)
        cleanup.start()
        await asyncio.sleep(0.2)  # the first pass runs at once; later ones every interval
        await cleanup.stop()
        await service.flush()  # a pass queued before the stop has run
        return store.list_requests()[1]

    assert asyncio.run(run(0)) == 4  # never
    assert asyncio.run(run(0.05)) == 1  # the newest stays
    assert store.list_requests()[0][0]["id"] == ids[-1]
