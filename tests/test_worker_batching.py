"""Continuous batching in the model worker, on real worker processes with the bundled demo model,
driven through the server-side `WorkerProxy`."""

import asyncio
import contextlib
import uuid
from pathlib import Path

import mlx_jupyter
from mlx_jupyter.engine.proxy import WorkerProxy, worker_environment
from mlx_jupyter.errors import WorkerError

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
DEMO = Path(mlx_jupyter.__file__).parent / "demo"

QUESTIONS = ["Hello!", "What is a notebook?", "How do I make pasta?", "Tell me about cats.",
             "What is the weather like?", "Write a short poem.", "What is Python?",
             "Where should I travel?", "Why is the sky blue?", "Tell me a story."]


def params(question, *, max_tokens=48, temperature=0.0, top_p=1.0, seed=None, stop=()):
    return {"prompt": None, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
            "seed": seed, "stop": list(stop)}


async def start_worker(max_batch_size=8, **options):
    worker = WorkerProxy("demo", DEMO, env=worker_environment(OPENBLAS),
                         max_batch_size=max_batch_size, **options)
    await worker.start()
    return worker


async def run(worker, request_params, *, request_id=None, on_event=None):
    """One request: (its text, its done message)."""
    request_id = request_id or uuid.uuid4().hex
    pieces, done = [], None
    async for message in worker.generate(request_id, request_params):
        assert message["id"] == request_id
        if on_event is not None:
            await on_event(request_id, message)
        if "text" in message:
            pieces.append(message["text"])
        else:
            assert message["done"] is True
            done = message
    assert done is not None
    return "".join(pieces), done


def tokens(usage):
    """Usage without cached_tokens: a prompt cache hit changes only that."""
    return {key: usage[key] for key in ("prompt_tokens", "completion_tokens")}


def check_done(done, finish_reasons=("stop", "length")):
    assert done["finish_reason"] in finish_reasons
    assert set(done["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens"}
    assert 0 <= done["usage"]["cached_tokens"] < done["usage"]["prompt_tokens"]
    assert done["usage"]["prompt_tokens"] > 0
    assert set(done["timings"]) <= {"prompt_tokens_per_second", "tokens_per_second"}
    if done["usage"]["completion_tokens"] > 1:  # a decode speed needs a token after the first
        assert done["timings"]["tokens_per_second"] > 0


@contextlib.asynccontextmanager
async def demo_worker(max_batch_size=8, **options):
    proxy = await start_worker(max_batch_size, **options)
    try:
        yield proxy
    finally:
        await proxy.stop()


async def solo_answers(worker, requests):
    return [await run(worker, p) for p in requests]


async def together_in_order(worker, requests):
    """The requests sent at once: their (text, done) and the most of them that were ever in
    flight together, by the order their messages arrived (a request is in flight from its
    first message to its done)."""
    arrivals = []

    async def record(request_id, message):
        arrivals.append((request_id, "done" in message))

    results = await asyncio.gather(*(run(worker, p, request_id=f"r{i}", on_event=record)
                                     for i, p in enumerate(requests)))
    in_flight, most = set(), 0
    for request_id, done in arrivals:
        in_flight.add(request_id)
        most = max(most, len(in_flight))
        if done:
            in_flight.discard(request_id)
    return results, most


async def test_batched_greedy_answers_equal_the_answers_alone():
    async with demo_worker() as worker:
        requests = [params(q) for q in QUESTIONS[:8]]
        alone = await solo_answers(worker, requests)
        together, most = await together_in_order(worker, requests)
        # Batched: in flight together (how many join the first step depends on when the worker
        # reads their commands: all eight here, seven on a busy machine; one at a time is 1).
        assert most > 1
        for (text_alone, done_alone), (text, done) in zip(alone, together):
            assert text == text_alone
            assert done["finish_reason"] == done_alone["finish_reason"]
            assert tokens(done["usage"]) == tokens(done_alone["usage"])
            check_done(done)
        assert len(set(text for text, _ in together)) > 1  # different prompts, different answers


async def test_a_cancel_ends_only_its_request():
    async with demo_worker() as worker:
        requests = [params(q, max_tokens=200) for q in QUESTIONS[:4]]
        alone = await solo_answers(worker, requests)
        victim = params("Tell me a long story about a cat and a dog.", max_tokens=200,
                        temperature=1.0, seed=7)
        cancelled = asyncio.Event()

        async def cancel_after_first_text(request_id, message):
            if "text" in message and not cancelled.is_set():
                cancelled.set()
                await worker.cancel(request_id)

        results = await asyncio.gather(run(worker, victim, on_event=cancel_after_first_text),
                                       *(run(worker, p) for p in requests))
        text, done = results[0]
        assert done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 200
        for (text_alone, _), (text, done) in zip(alone, results[1:]):
            assert text == text_alone
            check_done(done)


async def test_cancelling_a_request_that_waits_for_a_slot():
    # 100 KV positions: the first request (6 + 64) leaves no room for a second beside it.
    async with demo_worker(max_batch_size=1, kv_reserve_tokens=100) as worker:
        first = asyncio.create_task(run(worker, params(QUESTIONS[0], max_tokens=64)))
        waiting = worker.generate("waiting", params(QUESTIONS[1]))
        # The generate command is written at once; the cancel follows it while the only slot
        # is still taken (or, at the latest, within a step of the request being admitted).
        first_event = asyncio.create_task(waiting.__anext__())
        await asyncio.sleep(0)
        await worker.cancel("waiting")
        event = await first_event
        while "done" not in event:
            event = await waiting.__anext__()
        await waiting.aclose()
        assert event["finish_reason"] == "cancelled"
        check_done((await first)[1])
        # The worker still serves requests afterwards.
        check_done((await run(worker, params(QUESTIONS[2], max_tokens=8)))[1])


async def test_stop_strings_and_max_tokens_per_request_inside_a_batch():
    async with demo_worker() as worker:
        question = QUESTIONS[1]
        full, full_done = await run(worker, params(question, max_tokens=64))
        words = full.split()
        assert len(words) >= 3, full
        stop_word = words[2]
        cut = full[:full.index(stop_word)]
        results = await asyncio.gather(
            run(worker, params(question, max_tokens=64, stop=[stop_word])),
            run(worker, params(question, max_tokens=3)),
            run(worker, params(question, max_tokens=64)),
            run(worker, params(QUESTIONS[3], max_tokens=1)),
        )
        (stopped, stopped_done), (short, short_done), (same, same_done), (one, one_done) = results
        assert stopped == cut and stopped_done["finish_reason"] == "stop"
        assert short_done["finish_reason"] == "length"
        assert short_done["usage"]["completion_tokens"] == 3 and full.startswith(short)
        assert same == full and tokens(same_done["usage"]) == tokens(full_done["usage"])
        assert one_done["finish_reason"] in ("length", "stop")
        assert one_done["usage"]["completion_tokens"] == 1


async def test_a_seeded_request_is_reproducible_alone_and_in_a_batch():
    async with demo_worker() as worker:
        seeded = params(QUESTIONS[5], max_tokens=40, temperature=1.0, top_p=0.95, seed=1234)
        first, _ = await run(worker, seeded)
        again, _ = await run(worker, seeded)
        assert first == again
        others = [params(q, max_tokens=40, temperature=1.0, seed=i)
                  for i, q in enumerate(QUESTIONS[:5])]
        batched = await asyncio.gather(run(worker, seeded), *(run(worker, p) for p in others),
                                       run(worker, params(QUESTIONS[6], temperature=0.9,
                                                          seed=99)))
        assert batched[0][0] == first
        other_seed, _ = await run(worker, {**seeded, "seed": 4321})
        assert other_seed != first or len(first) == 0


async def test_the_worker_checks_the_resolved_parameters_and_supplies_none():
    """The server resolves every parameter (defaults, the seed of a sampled request): a
    command that lacks one, or has one out of range, fails alone with the parameter named."""
    async with demo_worker() as worker:
        good = params(QUESTIONS[0], max_tokens=8)
        for broken, named in [({"seed": None, "temperature": 1.0}, "seed"),
                              ({"top_p": None}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
                              ({"stop": [""]}, "stop"), ({"prompt": "Hi"}, "prompt")]:
            try:
                await run(worker, {**good, **broken})
            except WorkerError as exc:
                assert "invalid generate command" in str(exc) and named in str(exc)
            else:
                raise AssertionError(f"{broken} was not refused")
        _, done = await run(worker, {**good, "seed": None})  # greedy: no seed needed
        check_done(done)


async def test_requests_beyond_the_kv_reservation_wait_and_then_complete():
    # How many requests a worker holds is the server's queue's to cap (max_batch_size); the
    # worker's own check is its KV reservation: 2 x 48 positions here, and each request needs
    # its prompt (6 to 10 tokens) + 32, so only two fit the batch at once.
    async with demo_worker(max_batch_size=2, kv_reserve_tokens=48) as worker:
        requests = [params(q, max_tokens=32) for q in QUESTIONS[:5]]
        alone = await solo_answers(worker, requests)
        together, most = await together_in_order(worker, requests)
        for (text_alone, done_alone), (text, done) in zip(alone, together):
            assert text == text_alone and tokens(done["usage"]) == tokens(done_alone["usage"])
            check_done(done)
        assert most == 2  # two at a time: batched, and never beyond what the KV holds


async def test_shutdown_ends_a_running_batch():
    worker = await start_worker()
    tasks = [asyncio.create_task(run(worker, params(q, max_tokens=200, temperature=1.0,
                                                    seed=i)))
             for i, q in enumerate(QUESTIONS[:3])]
    await asyncio.sleep(0.5)
    await worker.stop()
    assert not worker.alive
    assert worker._process.returncode == 0  # it ended itself, it was not killed
    for task in tasks:
        try:
            _, done = await task
            assert done["finish_reason"] in ("cancelled", "stop", "length")
        except Exception as exc:  # the worker went away before this request's end was read
            assert "exited" in str(exc)


async def test_a_bad_request_fails_alone():
    async with demo_worker() as worker:
        good = params(QUESTIONS[0])
        text_alone, _ = await run(worker, good)
        bad, (text, done) = await asyncio.gather(run(worker, params(QUESTIONS[1], max_tokens=0)),
                                                 run(worker, good), return_exceptions=True)
        assert isinstance(bad, WorkerError) and "generation failed" in str(bad)
        assert text == text_alone
        check_done(done)
