"""The worker's prompt cache, on real worker processes with the bundled demo model: a request
whose prompt shares a prefix with an earlier one reuses that prefix's KV state, reports it as
``cached_tokens``, and answers exactly as a worker without a cache does (temperature 0)."""

import asyncio
import contextlib
import uuid

from mlx_jupyter.engine.proxy import WorkerProxy, worker_environment

from test_worker_batching import DEMO, OPENBLAS

SYSTEM = ("You are a careful, friendly assistant for people who work in Jupyter notebooks. "
          "Answer briefly, explain your reasoning in plain words, prefer short code examples, "
          "and say so when you are not sure about something. ") * 2


@contextlib.asynccontextmanager
async def worker(prompt_cache_bytes=256 * 1024**2, max_batch_size=8):
    proxy = WorkerProxy("demo", DEMO, env=worker_environment(OPENBLAS),
                        max_batch_size=max_batch_size, prompt_cache_bytes=prompt_cache_bytes)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


def chat(question, *, system=None, max_tokens=40, stop=()):
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return {"prompt": None, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "top_p": 1.0, "seed": None, "stop": list(stop)}


async def run(proxy, request_params):
    pieces, done = [], None
    async for message in proxy.generate(uuid.uuid4().hex, request_params):
        if "text" in message:
            pieces.append(message["text"])
        else:
            done = message
    assert done is not None and done["finish_reason"] in ("stop", "length")
    return "".join(pieces), done["usage"]


def same_answer(a, b):
    (text_a, usage_a), (text_b, usage_b) = a, b
    assert text_a == text_b
    assert usage_a["prompt_tokens"] == usage_b["prompt_tokens"]
    assert usage_a["completion_tokens"] == usage_b["completion_tokens"]


async def test_the_same_prompt_twice_is_served_from_the_cache():
    request = chat("What is a notebook?")
    async with worker(0) as uncached:
        reference = await run(uncached, request)
        again = await run(uncached, request)
    assert reference[1]["cached_tokens"] == 0 and again[1]["cached_tokens"] == 0
    async with worker() as cached:  # the default: on
        first = await run(cached, request)
        second = await run(cached, request)
    assert first[1]["cached_tokens"] == 0
    # Everything but the last prompt token, whose logits start the completion.
    assert second[1]["cached_tokens"] == second[1]["prompt_tokens"] - 1
    same_answer(first, reference)
    same_answer(second, reference)


async def test_prompts_sharing_a_system_message_reuse_its_prefix():
    questions = ["How do I make pasta?", "Tell me about cats.", "Why is the sky blue?",
                 "Write a short poem."]
    requests = [chat(q, system=SYSTEM) for q in questions]
    async with worker(0) as uncached:
        reference = [await run(uncached, r) for r in requests]
    async with worker() as cached:
        answers = [await run(cached, r) for r in requests]
        # Then all at once, in one batch, each with a cached prefix of its own.
        together = await asyncio.gather(*(run(cached, r) for r in requests))
    assert answers[0][1]["cached_tokens"] == 0
    for answer in answers[1:]:
        usage = answer[1]
        assert 50 < usage["cached_tokens"] < usage["prompt_tokens"]  # the system message
    for answer in together:
        assert answer[1]["cached_tokens"] == answer[1]["prompt_tokens"] - 1
    for answer, expected in zip(answers, reference):
        same_answer(answer, expected)
    for answer, expected in zip(together, reference):
        same_answer(answer, expected)


async def test_a_cache_too_small_for_any_entry_keeps_nothing():
    request = chat("Tell me a story.", system=SYSTEM)
    async with worker(1024) as tiny:
        first = await run(tiny, request)
        second = await run(tiny, request)
    assert first[1]["cached_tokens"] == 0 and second[1]["cached_tokens"] == 0
    same_answer(first, second)


async def test_an_answer_ended_by_a_stop_string_is_cached_too():
    async with worker(0) as uncached:
        full = await run(uncached, chat("Tell me about cats.", max_tokens=30))
    assert len(full[0]) > 4
    stop = full[0][2:4]
    async with worker(0) as uncached:
        reference = await run(uncached, chat("Tell me about cats.", stop=[stop]))
    async with worker() as cached:
        first = await run(cached, chat("Tell me about cats.", stop=[stop]))
        second = await run(cached, chat("Tell me about cats.", max_tokens=30))
    same_answer(first, reference)
    assert second[1]["cached_tokens"] == second[1]["prompt_tokens"] - 1
    same_answer(second, full)
