"""Rebuild the bundled demo model (mlx_jupyter/demo) from the text in scripts/demo_corpus.

The demo model is a toy: a ~1M parameter Llama that answers short chat questions in simple
English. It exists so the extension, its tests and its demos have a real model to load
offline. Everything here is seeded, so two runs on the same machine and software give
byte-identical files.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 HF_HUB_OFFLINE=1 \\
        .venv/bin/python scripts/train_demo_model.py

(On Linux the LD_PRELOAD swaps the slow BLAS bundled with the mlx CPU wheel for OpenBLAS.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# OpenBLAS splits matrix products by its thread count, and the split changes float rounding:
# 1 and 2 threads give different weights. Pin it so the result does not depend on the
# machine's core count; one thread is only ~20% slower here, and faster on a busy machine.
# OpenBLAS reads the setting once, when loaded (with LD_PRELOAD: at process start), so
# restart this script with it set.
BLAS_THREADS = "1"
if os.environ.get("OPENBLAS_NUM_THREADS") != BLAS_THREADS:
    os.environ["OPENBLAS_NUM_THREADS"] = BLAS_THREADS
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet; the vocab is the same either way
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models.llama import Model, ModelArgs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "demo_corpus"

BOS, USER, ASSISTANT, SYSTEM, END, PAD, TOOL = (
    "<|bos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|pad|>", "<|tool|>")
SPECIAL_TOKENS = [BOS, USER, ASSISTANT, SYSTEM, END, PAD, TOOL]  # ids 0..6, in this order
VOCAB_SIZE = 2048
CONTEXT = 256

# Renders each message as <|role|>content<|end|>; the generation prompt opens an assistant turn.
# Tools, when given, come first as a system turn, one short line each ("name(params):
# description": the context is 256 tokens). An assistant's tool calls are written as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, one after another on new lines:
# the Hermes-style syntax that mlx-lm's json_tools parser reads, and the syntax a forced call
# is written in; a tool's result is a <|tool|> turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>Tools:' }}"
    "{% for tool in tools %}"
    "{% set f = tool.function if tool.function is defined else tool %}"
    "{{ '\\n' + f.name + '(' }}"
    "{% if f.parameters is defined and f.parameters.properties is defined %}"
    "{{ f.parameters.properties | join(', ') }}{% endif %}"
    "{{ ')' }}"
    "{% if f.description is defined and f.description %}{{ ': ' + f.description }}{% endif %}"
    "{% endfor %}{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}"
    "{{ '<|assistant|>' + (message.content or '') }}"
    "{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>{\"name\": ' + tool_call.name | tojson + ', \"arguments\": ' }}"
    "{% if tool_call.arguments is string %}{{ tool_call.arguments }}"
    "{% else %}{{ tool_call.arguments | tojson }}{% endif %}"
    "{{ '}</tool_call>' }}"
    "{% endfor %}{{ '<|end|>' }}"
    "{% else %}{{ '<|' + message['role'] + '|>' + (message['content'] or '') + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

MODEL_ARGS = dict(
    model_type="llama",
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=384,
    num_attention_heads=4,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB_SIZE,
    rope_theta=10000.0,
    max_position_embeddings=CONTEXT,
    tie_word_embeddings=True,
)

KEEP_CAPITALIZED = {"I", "Python", "Jupyter", "JupyterLab", "MLX", "NumPy"}
SELF_CHECK_PROMPTS = ["Hello!", "What is a Jupyter notebook?", "Write a poem about the sea."]


# --- corpus ---------------------------------------------------------------------------------

def load_dialogues() -> list[dict]:
    with open(CORPUS / "dialogues.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_fragments() -> dict:
    return json.loads((CORPUS / "fragments.json").read_text(encoding="utf-8"))


def combine_fragments(frag: dict, rng: random.Random) -> list[dict]:
    """Multiplies the hand-written fragment tables into more (still natural) dialogues.

    Each table pairs a few question phrasings with answers; every item is asked in one or two
    of them, so the model sees the same fact behind different wordings.
    """
    out: list[dict] = []

    def ask(forms: list[str], answer: str, k: int = 2, **slots: str) -> None:
        for form in rng.sample(forms, min(k, len(forms))):
            out.append({"user": form.format(**slots), "assistant": answer})

    g = frag["greetings"]
    for user in g["user"]:
        for answer in rng.sample(g["assistant"], 2):
            out.append({"user": user, "assistant": answer})
    for item in frag["feelings"]["items"]:
        ask(frag["feelings"]["questions"], item["answer"], feeling=item["feeling"])
    for item in frag["explain"]["items"]:
        ask(frag["explain"]["questions"], item["answer"], topic=item["topic"])
    for item in frag["python"]["items"]:
        ask(frag["python"]["questions"], item["answer"], task=item["task"])
    for item in frag["animals"]["items"]:
        for form in rng.sample(frag["animals"]["questions"], 3):
            facts = rng.sample(item["facts"], 2)
            out.append({"user": form.format(name=item["name"]), "assistant": " ".join(facts)})
    for item in frag["recipes"]["items"]:
        ask(frag["recipes"]["how"], item["steps"], dish=item["dish"])
        ask(frag["recipes"]["need"], f"You need {item['needs']}.", k=1, dish=item["dish"])
    for item in frag["weather"]["items"]:
        ask(frag["weather"]["wear"], item["wear"], condition=item["condition"])
        ask(frag["weather"]["do"], item["do"], condition=item["condition"])
    for item in frag["travel"]["items"]:
        ask(frag["travel"]["tips"], item["tips"], place=item["place"])
        ask(frag["travel"]["pack"], item["pack"], k=1, place=item["place"])
    for country, capital in frag["capitals"]["items"]:
        ask(frag["capitals"]["questions"], f"The capital of {country} is {capital}.", k=1,
            country=country)
    for word, opposite in frag["opposites"]["items"]:
        ask(frag["opposites"]["questions"], f"The opposite of {word} is {opposite}.", k=1,
            word=word)
    out.extend(make_stories(frag["stories"], rng))
    # Questions beyond a toy model get a short, honest answer, so that unfamiliar prompts
    # fall back to grammatical sentences instead of word salad.
    hard = frag["too_hard"]
    for topic in hard["topics"]:
        for form in rng.sample(hard["questions"], 2):
            out.append({"user": form.format(topic=topic),
                        "assistant": rng.choice(hard["answers"])})
    for user in frag["unclear"]["questions"]:
        out.append({"user": user, "assistant": rng.choice(frag["unclear"]["answers"])})
    for _, city in frag["capitals"]["items"]:
        out.append({"user": rng.choice(frag["live_weather"]["questions"]).format(city=city),
                    "assistant": rng.choice(frag["live_weather"]["answers"])})
    for _ in range(30):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        out.append({"user": rng.choice(frag["math"]["questions"]).format(a=a, b=b),
                    "assistant": rng.choice(frag["math"]["answers"])})
    return out


def load_table(name: str) -> dict:
    return json.loads((CORPUS / name).read_text(encoding="utf-8"))


def tool_spec(function: dict) -> dict:
    """A function of tools.json as a request's `tools` carry it."""
    return {"type": "function", "function": {key: function[key] for key in
                                             ("name", "description", "parameters")}}


def tool_call_text(name: str, arguments: dict) -> str:
    """A call as the chat template writes it (for the tokenizer's training text)."""
    return (f'<tool_call>{{"name": {json.dumps(name)}, "arguments": '
            f'{json.dumps(arguments, ensure_ascii=False)}}}</tool_call>')


def slot_values(table: dict, rng: random.Random) -> dict:
    """One random filling of every slot the tool dialogues use, consistent with itself (the
    sum is the sum, the translation that of the phrase)."""
    slots = table["slots"]
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    source, target, factor = rng.choice(slots["units"])
    value = rng.randint(1, 50)
    phrase, language, translation = rng.choice(slots["translations"])
    city, city2 = rng.sample(slots["city"], 2)
    return {
        "city": city, "city2": city2, "sky": rng.choice(slots["sky"]),
        "t": rng.randint(-5, 35), "a": a, "b": b, "sum": a + b, "product": a * b,
        "clock": f"{rng.randint(0, 23):02d}:{rng.choice([0, 15, 30, 45]):02d}",
        "minutes": rng.choice([1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 90]),
        "topic": rng.choice(slots["topic"]), "count": rng.randint(1, 40),
        "person": rng.choice(slots["person"]), "folder": rng.choice(slots["folder"]),
        "path": rng.choice(slots["path"]), "phrase": phrase, "language": language,
        "translation": translation, "value": value, "from_unit": source, "to_unit": target,
        "converted": round(value * factor, 1),
    }


def call_arguments(function: dict, values: dict) -> dict:
    """The arguments of a call: a slot alone keeps its type (a number stays a number)."""
    out = {}
    for name, template in function["arguments"].items():
        slot = template[1:-1]
        out[name] = values[slot] if template == "{" + slot + "}" else template.format(**values)
    return out


def make_tool_conversations(table: dict, rng: random.Random
                            ) -> list[tuple[list[dict], list[dict]]]:
    """(messages, tools) pairs: a request one offered function answers, called, half of them
    through to its result and the final answer; the same kind of request with that function not
    offered, answered in words; and two calls at once."""
    functions = table["functions"]
    out = []

    def offer(function: dict | None, extra: int) -> list[dict]:
        others = rng.sample([f for f in functions if f is not function], extra)
        offered = ([function] if function else []) + others
        rng.shuffle(offered)
        return [tool_spec(f) for f in offered]

    def called(calls: list[tuple[dict, dict]]) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": f["name"], "arguments": arguments}}
            for f, arguments in calls]}

    for function in functions:
        for form in function["asks"]:
            for _ in range(4):
                values = slot_values(table, rng)
                messages = [{"role": "user", "content": form.format(**values)},
                            called([(function, call_arguments(function, values))])]
                if rng.random() < 0.5:
                    messages += [{"role": "tool", "content": function["result"].format(**values)},
                                 {"role": "assistant", "content":
                                  function["answer"].format(**values)}]
                out.append((messages, offer(function, rng.randint(0, 2))))
            values = slot_values(table, rng)
            out.append(([{"role": "user", "content": form.format(**values)},
                         {"role": "assistant", "content": rng.choice(table["not_offered"])}],
                        offer(None, rng.randint(1, 2))))
    by_name = {f["name"]: f for f in functions}
    for form in table["parallel_asks"]:
        function = by_name["get_time" if "time" in form else "get_weather"]
        for _ in range(8):
            values = slot_values(table, rng)
            calls = [(function, {"city": values[key]}) for key in ("city", "city2")]
            out.append(([{"role": "user", "content": form.format(**values)}, called(calls)],
                        offer(function, rng.randint(0, 1))))
    return out


def make_code_dialogues(table: dict, rng: random.Random) -> list[dict]:
    """Answers with a fenced code block: Python tasks and the errors people paste."""
    out = []
    for item in table["items"]:
        for form in rng.sample(table["questions"], 2):
            out.append({"user": form.format(task=item["task"]),
                        "assistant": f"{rng.choice(table['intros'])}\n\n```python\n"
                                     f"{item['code']}\n```\n\n{item['note']}"})
    for item in table["errors"]:
        for form in rng.sample(table["error_questions"], 2):
            out.append({"user": form.format(error=item["error"]),
                        "assistant": f"{item['answer']}\n\n```python\n{item['code']}\n```"})
    return out


def make_stories(s: dict, rng: random.Random) -> list[dict]:
    stories = []
    for hero in s["heroes"]:
        for form in rng.sample(s["questions"], 3):
            setting, event, ending = (rng.choice(s[k]) for k in ("settings", "events", "endings"))
            story = (f"Once upon a time, {hero['name']} lived {setting}. "
                     f"{event.format(the=hero['the'])} {ending.format(the=hero['the'])}")
            stories.append({"user": form.format(short=hero["short"]), "assistant": story})
    return stories


def rephrase(dialogues: list[dict], prefixes: list[str], rng: random.Random) -> list[dict]:
    """The hand-written questions once more, worded a little differently (a prefix, lower case,
    no final punctuation), so the model ties answers to the words that matter, not to one
    exact phrasing."""
    out = []
    for d in dialogues:
        q = d["user"]
        first, rest = q.split(" ", 1) if " " in q else (q, "")
        lowered = q if first in KEEP_CAPITALIZED else first.lower() + (" " + rest if rest else "")
        style = rng.randrange(3)
        if style == 0:
            variant = rng.choice(prefixes) + lowered
        elif style == 1:
            variant = lowered
        else:
            variant = q.rstrip("?.!")
        out.append({"user": variant, "assistant": d["assistant"]})
    return out


def build_conversations(rng: random.Random
                        ) -> tuple[list[tuple[list[dict], list[dict]]], list[str], list[str]]:
    """Chat conversations with the tools they offer (some with a system prompt, some two turns
    long, some offering tools they do not need), plain texts, and extra tokenizer text.

    The plain texts (a share of the answers on their own) teach the model to write and then
    stop on a bare prompt without the chat template as well.
    """
    frag = load_fragments()
    tools = load_table("tools.json")
    written = load_dialogues()
    dialogues = (written + rephrase(written, frag["user_prefixes"], rng)
                 + combine_fragments(frag, rng) + make_code_dialogues(load_table("code.json"), rng))
    systems = frag["system_prompts"]
    specs = [tool_spec(f) for f in tools["functions"]]
    # Answers to what a tool would do (live weather, arithmetic): such a question is asked with
    # tools only in the tool dialogues.
    toolish = set(frag["live_weather"]["answers"] + frag["math"]["answers"])
    conversations, plain = [], []
    for d in dialogues:
        messages = []
        if rng.random() < 0.15:
            messages.append({"role": "system", "content": rng.choice(systems)})
        turns = [d] + ([rng.choice(dialogues)] if rng.random() < 0.15 else [])
        for t in turns:
            messages += [{"role": "user", "content": t["user"]},
                         {"role": "assistant", "content": t["assistant"]}]
        offered = (rng.sample(specs, rng.randint(1, 2))
                   if rng.random() < 0.6 and d["assistant"] not in toolish else [])
        conversations.append((messages, offered))
        if rng.random() < 0.25:
            plain.append(d["assistant"])
    conversations += make_tool_conversations(tools, rng)
    extra = [tool_call_text(f["name"], {k: "" for k in f["parameters"]["properties"]})
             for f in tools["functions"]]
    extra += [f"{f['name']}({', '.join(f['parameters']['properties'])}): {f['description']}"
              for f in tools["functions"]]
    return conversations, plain, extra


# --- tokenizer ------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # A plain encode() gets <|bos|> like in training; the chat template writes its own.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    tok.save(str(out / "tokenizer.json"))


def write_tokenizer_config(out: Path) -> None:
    specials = {"bos_token": BOS, "eos_token": END, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM, TOOL],
        "model_max_length": CONTEXT,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "tool_parser_type": "json_tools",
    }
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json",
               {**specials, "additional_special_tokens": [USER, ASSISTANT, SYSTEM, TOOL]})


def tokenize_corpus(out: Path, conversations: list[tuple[list[dict], list[dict]]],
                    plain: list[str]):
    """Token ids plus a 0/1 mask per example: the loss only counts what the model should say."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    examples = []
    for messages, tools in conversations:
        ids, mask = [], []
        # Prefix up to each assistant turn is context (mask 0); the turn and its <|end|> are 1.
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(messages[:i], tools=tools or None,
                                             add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template(messages[:i + 1], tools=tools or None,
                                           tokenize=False)
            p_ids = tok.encode(prompt, add_special_tokens=False)
            f_ids = tok.encode(full, add_special_tokens=False)
            assert f_ids[:len(p_ids)] == p_ids and p_ids[:len(ids)] == ids
            mask += [0] * (len(p_ids) - len(ids)) + [1] * (len(f_ids) - len(p_ids))
            ids = f_ids
        examples.append((ids, mask))
    for text in plain:
        ids = tok.encode(text) + [tok.eos_token_id]
        examples.append((ids, [0] + [1] * (len(ids) - 1)))
    assert all(len(ids) <= CONTEXT + 1 for ids, _ in examples)
    return examples, tok


# --- model and training ---------------------------------------------------------------------

def batches(examples, rng: random.Random, tokens_per_batch: int):
    """Endless batches of similar-length examples (little padding), in seeded random order.

    Every example is its own row starting at position 0, exactly as at inference.
    """
    while True:
        order = list(examples)
        rng.shuffle(order)
        order.sort(key=lambda e: len(e[0]))  # stable: ties stay shuffled
        epoch, rows = [], []
        for ex in order:
            if rows and (len(rows) + 1) * len(ex[0]) > tokens_per_batch:
                epoch.append(rows)
                rows = []
            rows.append(ex)
        epoch.append(rows)
        rng.shuffle(epoch)
        for rows in epoch:
            yield to_arrays(rows)


def to_arrays(rows):
    width = max(len(ids) for ids, _ in rows)
    pad = SPECIAL_TOKENS.index(PAD)
    ids = mx.array([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    mask = mx.array([m + [0] * (width - len(m)) for _, m in rows], dtype=mx.float32)
    # Predict token t+1 from tokens ..t; the mask belongs to the predicted token.
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def loss_fn(model, inputs, targets, mask):
    losses = nn.losses.cross_entropy(model(inputs), targets) * mask
    return losses.sum() / mask.sum()


def train(model, examples, rng: random.Random, steps: int, lr: float, batch_tokens: int) -> None:
    warmup = max(1, steps // 15)
    schedule = optim.join_schedules(
        [optim.linear_schedule(lr / 100, lr, warmup),
         optim.cosine_decay(lr, steps - warmup, end=lr / 30)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    data = batches(examples, rng, tokens_per_batch=batch_tokens)
    started, running = time.perf_counter(), None
    for step in range(1, steps + 1):
        loss, grads = loss_and_grad(model, *next(data))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 25 == 0 or step == steps:
            print(f"step {step:4d}/{steps}  loss {running:.3f}  "
                  f"lr {schedule(step).item():.2e}  {time.perf_counter() - started:6.1f}s",
                  flush=True)


def save_model(model, out: Path, tok, dtype: str) -> None:
    params = sorted(tree_flatten(model.parameters()))  # names as mlx_lm.load expects them
    weights = {name: value.astype(getattr(mx, dtype)) for name, value in params}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    bos, eos = tok.convert_tokens_to_ids([BOS, END])
    write_json(out / "config.json", {
        "architectures": ["LlamaForCausalLM"], **MODEL_ARGS,
        "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": tok.convert_tokens_to_ids(PAD), "torch_dtype": dtype})
    write_json(out / "generation_config.json",
               {"bos_token_id": bos, "eos_token_id": eos,
                "pad_token_id": tok.convert_tokens_to_ids(PAD)})


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- self-check -----------------------------------------------------------------------------

def self_check(out: Path) -> None:
    """Load the folder the way the extension does and print a few answers."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(out))
    for temp in (0.0, 0.7):
        mx.random.seed(0)
        print(f"\n--- temperature {temp} ---")
        for question in SELF_CHECK_PROMPTS:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True,
                tokenize=False)
            text, last = "", None
            for last in stream_generate(model, tokenizer, prompt, max_tokens=64,
                                        sampler=make_sampler(temp=temp)):
                text += last.text
            print(f"> {question}\n{text!r}\n  [finish={last.finish_reason}, "
                  f"tokens={last.generation_tokens}]")
    evaluate_tools(model, tokenizer)


def evaluate_tools(model, tokenizer) -> None:
    """The held-out tool evaluation (tests/test_demo_tools.py runs it through the server):
    greedy answers to prompts never trained on, offered tools as tool_choice auto offers them."""
    from mlx_lm import generate

    held_out = load_table("heldout.json")
    specs = {f["name"]: tool_spec(f) for f in load_table("tools.json")["functions"]}
    print("\n--- held-out prompts, tools offered ---")
    for kind in ("tool_prompts", "plain_prompts"):
        calls = 0
        for case in held_out[kind]:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": case["prompt"]}],
                tools=[specs[name] for name in case["tools"]], add_generation_prompt=True,
                tokenize=False)
            text = generate(model, tokenizer, prompt, max_tokens=80)
            calls += tokenizer.tool_call_start in text
            print(f"> {case['prompt']}\n{text!r}")
        print(f"{kind}: {calls}/{len(held_out[kind])} answered with a tool call\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "mlx_jupyter" / "demo")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    # Peak learning rate: 1.5e-3 and up trained far slower for this model, 5e-4 a bit slower.
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    # float32 fits the 5 MB budget and runs about twice as fast as float16 on a CPU.
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = parser.parse_args()

    started = time.perf_counter()
    rng = random.Random(args.seed)
    mx.random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    conversations, plain, extra = build_conversations(rng)
    texts = [m["content"] for c, _ in conversations for m in c] + plain + extra
    print(f"corpus: {len(conversations)} conversations, {len(plain)} plain texts, "
          f"{sum(len(t.encode()) for t in texts) / 1024:.0f} KiB")
    train_tokenizer(texts, args.out)
    write_tokenizer_config(args.out)
    examples, tok = tokenize_corpus(args.out, conversations, plain)
    print(f"tokens: {sum(len(ids) for ids, _ in examples)} in {len(examples)} examples")

    model = Model(ModelArgs.from_dict(MODEL_ARGS))
    mx.eval(model.parameters())
    print(f"parameters: {sum(v.size for _, v in tree_flatten(model.parameters())):,}")
    train(model, examples, rng, args.steps, args.lr, args.batch_tokens)
    save_model(model, args.out, tok, args.dtype)
    print(f"trained and saved to {args.out} in {time.perf_counter() - started:.0f}s")

    self_check(args.out)
    print(f"\ntotal time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
