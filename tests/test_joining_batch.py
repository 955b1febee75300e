"""`engine.batching.JoiningBatchGenerator` against mlx-lm's own `BatchGenerator`, in this process
on the bundled demo model: requests that join a running batch get exactly the tokens they get
with mlx-lm's generator, and each group of joiners saves the forward pass it costs there."""

import pytest
from mlx_lm import load  # a dependency of the package: missing, the tests fail, not skip

from mlx_jupyter.engine import batching
from test_worker_batching import DEMO, QUESTIONS


class CountingModel:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


@pytest.fixture(scope="module")
def demo():
    return load(str(DEMO))


def prompt(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True)


def run_schedule(generator_class, demo, schedule, *, max_tokens=24, remove_after=None):
    """Runs the generator until every request ends. schedule maps a step number to the questions
    inserted before that step, so requests join a batch that is already generating. With
    remove_after=(uid, step), that request is removed just before that step. Returns ({uid: its
    tokens}, forward passes)."""
    model, tokenizer = demo
    counting = CountingModel(model)
    generator = generator_class(counting, completion_batch_size=8, prefill_batch_size=8)
    tokens, step = {}, 0
    try:
        while step <= max(schedule) or generator._generation_batch.uids or \
                generator._prompt_batch.uids or generator._unprocessed_sequences:
            for question in schedule.get(step, ()):
                (uid,) = generator.insert([prompt(tokenizer, question)], max_tokens=[max_tokens])
                tokens[uid] = []
            if remove_after is not None and remove_after[1] == step:
                batch = generator._generation_batch
                assert batch._joining[batch.uids.index(remove_after[0])]  # no step of its own yet
                generator.remove([remove_after[0]])
            _, responses = generator.next()
            for response in responses:
                tokens[response.uid].append(response.token)
            step += 1
    finally:
        generator.close()
    return tokens, counting.calls


def test_the_installed_mlx_lm_has_what_joining_relies_on():
    assert batching.supported()


def test_joiners_get_mlx_lms_tokens_and_share_the_decode_step(demo):
    # One request alone, two joining it after a few steps, three more later: three join groups.
    schedule = {0: QUESTIONS[:1], 4: QUESTIONS[1:3], 9: QUESTIONS[3:6]}
    theirs, their_passes = run_schedule(batching.BatchGenerator, demo, schedule)
    ours, our_passes = run_schedule(batching.JoiningBatchGenerator, demo, schedule)
    assert ours == theirs
    assert all(len(answer) > 1 for answer in ours.values())
    # mlx-lm runs a forward pass of its own for each group joining a running batch; here they
    # ride along. (The first request found no batch to join: the same pass either way.)
    assert their_passes - our_passes == len(schedule) - 1


def test_the_same_tokens_as_each_request_alone(demo):
    together, _ = run_schedule(batching.JoiningBatchGenerator, demo,
                               {0: QUESTIONS[:2], 2: QUESTIONS[2:5], 3: QUESTIONS[5:8]})
    for uid, question in enumerate(QUESTIONS[:8]):
        alone, _ = run_schedule(batching.BatchGenerator, demo, {0: [question]})
        assert together[uid] == alone[0], question


def test_a_joiner_removed_before_its_first_token_leaves_the_others_intact(demo):
    schedule = {0: QUESTIONS[:2], 3: QUESTIONS[2:4]}
    expected, _ = run_schedule(batching.JoiningBatchGenerator, demo, schedule)
    # uid 2 is prefilled at step 3 and joins at step 4: remove it before its first decode step.
    tokens, _ = run_schedule(batching.JoiningBatchGenerator, demo, schedule,
                             remove_after=(2, 5))
    assert tokens[2] == []
    assert {uid: tokens[uid] for uid in (0, 1, 3)} == {uid: expected[uid] for uid in (0, 1, 3)}
