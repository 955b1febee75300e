"""jupyter-ai 3's Jupyternaut, built by its own code, against a live server.

Jupyternaut (jupyter_ai_jupyternaut.jupyternaut.JupyternautPersona) answers a chat message in
process_message: it resolves its LiteLLM model from its config, renders its system prompt
template, builds a LangChain agent in get_agent (its ChatLiteLLM, streaming, with prompt
caching on the system message; create_agent with its 14 notebook, JupyterLab and bash tools and
its tool-error middleware) and streams the agent's events (astream_events v3) into the chat.
Here those methods run unchanged on the least a persona needs around them (a config, a chat id,
a stream_message that keeps the reply): the requests are the ones JupyterLab's Jupyternaut
sends, with the server set up as a user would (`openai/<model>`, api_base `<server>/mlx/v1`,
the Jupyter token as the OpenAI key).

The model: a random-weight Llama (hidden 64, 2 layers) with a Hermes-style tool template, an
8k context and a tokenizer of 8,192 pieces, in which the first prompt (system prompt and tools)
is ~7,800 tokens, and which favours "{" and "}" (see FORCED_TOOL).
Everything goes through a recording relay, so a failure shows the exact bodies Jupyternaut sent
and what the server answered.
"""

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches prices

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import jsonschema
import pytest
from model_factory import make_tool_model
from recording_proxy import RecordingProxy

MODEL = "jupyternaut-8k"
# Forced in the round trip. Every Jupyternaut tool's parameters leave keys open (no
# additionalProperties: false), and random weights never end a free key or string; this one
# has no parameters, and the model favours "{" and "}", so its arguments are `{}`. Without a
# JupyterLab page to run it in, it fails, and Jupyternaut's tool-error middleware sends the
# error back as the tool's result, as it does in JupyterLab when a tool fails.
FORCED_TOOL = "run_all_cells"
USER = "tester"


@pytest.fixture(scope="module")
def naut_model(live_server):
    """The model, registered with the session's live server; unloaded and forgotten after
    (other tests count that server's models)."""
    folder = make_tool_model(live_server.root_dir / MODEL, context=8192, vocab_size=8192,
                             favour=("{", "}")).path
    answer = live_server.request("POST", "mlx/api/models",
                                 json={"name": MODEL, "path": str(folder)})
    assert answer.status_code == 201, answer.text
    yield MODEL
    assert live_server.request("POST", f"mlx/api/models/{MODEL}/unload").status_code == 200
    assert live_server.request("DELETE", f"mlx/api/models/{MODEL}").status_code in (200, 204)


@pytest.fixture(scope="module")
def proxy(live_server, tmp_path_factory):
    relay = RecordingProxy(live_server.url)
    # where the exact bytes of Jupyternaut's first request body are written
    relay.first_body = tmp_path_factory.getbasetemp() / "jupyternaut-first-request.json"
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def jupyternaut_module():
    """jupyter_ai_jupyternaut's persona module, imported when a test needs it (its imports,
    litellm's among them, take seconds)."""
    from jupyter_ai_jupyternaut.jupyternaut import jupyternaut

    return jupyternaut


def persona(module, model_id: str, model_args: dict, chat_id: str):
    """A JupyternautPersona's own methods on the least that they use of a persona."""
    from jupyter_ai_persona_manager import BasePersona

    naut = module.JupyternautPersona
    methods = ("process_message", "_resolve_model", "_read_config_fields", "get_system_prompt",
               "get_agent", "get_tools", "get_memory_store", "_create_memory_store",
               "_create_tool_error_handler")

    class Persona:
        process_attachments = BasePersona.process_attachments
        name = "Jupyternaut"

        def __init__(self):
            # Jupyternaut's default model and its fields, as its settings keep them
            self.config_manager = SimpleNamespace(
                chat_model=model_id, chat_model_args=model_args,
                get_custom_model=lambda _id: None,
                get_config=lambda: SimpleNamespace(fields={model_id: model_args}))
            self.chat = SimpleNamespace(get_id=lambda: chat_id)
            self.log = logging.getLogger("jupyternaut")
            self.replies: list[str] = []  # what stream_message put in the chat
            self.sent: list[str] = []  # send_message's bodies: Jupyternaut's errors

        def get_model(self):
            return None  # the persona's default: the configured model

        def get_mcp_settings(self):
            return None  # no MCP servers configured

        async def stream_message(self, reply_stream):
            chunks = [chunk async for chunk in reply_stream]
            self.replies.append("".join(chunk for chunk in chunks if chunk))

        def send_message(self, body: str) -> None:
            self.sent.append(body)

    for method in methods:
        setattr(Persona, method, getattr(naut, method))
    return Persona()


def ask(module, proxy, live_server, monkeypatch, chat_id: str, body: str):
    """Jupyternaut's process_message for one chat message; its persona after."""
    from jupyterlab_chat.models import Message

    # The key as Jupyternaut's secrets manager gives it to litellm: in the environment.
    monkeypatch.setenv("OPENAI_API_KEY", live_server.token)
    # Its model's fields as a user sets them in Jupyternaut's settings: the server, and a
    # short greedy answer (random weights; each answer then takes ~1 s on 2 cores).
    fields = {"api_base": proxy.url + "mlx/v1", "max_tokens": 64, "temperature": 0}
    naut = persona(module, f"openai/{MODEL}", fields, chat_id)
    proxy.clear()
    message = Message(body=body, id=f"{chat_id}-1", time=time.time(), sender=USER)
    asyncio.run(asyncio.wait_for(naut.process_message(message), 120))
    return naut


def shortened(value, limit: int = 300):
    """A JSON value with its long strings cut, for a message one can read."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} characters)"
    if isinstance(value, list):
        return [shortened(item, limit) for item in value]
    if isinstance(value, dict):
        return {key: shortened(item, limit) for key, item in value.items()}
    return value


def report(proxy, why: str) -> str:
    """A failure's message: why; Jupyternaut's first request body, its long strings cut (the
    exact bytes are written beside the test's log); then, cut too, everything that went
    through the relay."""
    posted = proxy.posted("chat/completions")
    if not posted:
        return f"{why}\n(Jupyternaut sent no chat completion)\n{proxy.transcript(limit=2000)}"
    proxy.first_body.write_bytes(posted[0].body)
    first = json.dumps(shortened(posted[0].json()), indent=1)
    return (f"{why}\n--- Jupyternaut's first request body (exact: {proxy.first_body}) ---\n"
            f"{first}\n--- through the relay ---\n{proxy.transcript(limit=2000)}")


def test_jupyternauts_first_message_streams_an_answer(naut_model, proxy, live_server,
                                                      monkeypatch, jupyternaut_module):
    naut = ask(jupyternaut_module, proxy, live_server, monkeypatch, "first",
               "Hello! What can you do?")
    assert not naut.sent, report(proxy, f"Jupyternaut answered with an error: {naut.sent}")
    assert naut.replies and naut.replies[0], report(proxy, "no answer streamed")
    [first] = proxy.posted("chat/completions")
    proxy.first_body.write_bytes(first.body)
    body = first.json()
    # the shape JupyterLab's Jupyternaut sends: streamed, its system prompt first, 14 tools
    assert body["stream"] is True and body["model"] == MODEL, report(proxy, "not streamed")
    assert body["messages"][0]["role"] == "system", report(proxy, "no system prompt first")
    assert body["messages"][-1] == {"role": "user", "content": "Hello! What can you do?"}, \
        report(proxy, "the user's message is not last as sent")
    assert len(body["tools"]) == 14 and "tool_choice" not in body, report(proxy, "tools")


def test_a_forced_call_of_a_jupyternaut_tool_completes_its_round_trip(
        naut_model, proxy, live_server, monkeypatch, jupyternaut_module):
    """The agent is Jupyternaut's, with one middleware more that names FORCED_TOOL as the
    tool_choice of the first model call only (after the tool's result the model chooses, as
    Jupyternaut lets it): the call comes back with arguments valid for the tool's schema, runs,
    its result goes back as a `tool` message after the assistant's tool_calls, and the final
    answer streams into the chat."""
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import HumanMessage

    @wrap_model_call
    async def force_the_first_call(request, handler):
        if isinstance(request.messages[-1], HumanMessage):
            request = request.override(tool_choice=FORCED_TOOL)
        return await handler(request)

    create_agent = jupyternaut_module.create_agent

    def create_forcing_agent(model, *, middleware=(), **options):
        return create_agent(model, middleware=[*middleware, force_the_first_call], **options)

    monkeypatch.setattr(jupyternaut_module, "create_agent", create_forcing_agent)
    naut = ask(jupyternaut_module, proxy, live_server, monkeypatch, "round-trip",
               "Run all the cells of my notebook.")
    assert not naut.sent, report(proxy, f"Jupyternaut answered with an error: {naut.sent}")
    posted = [request.json() for request in proxy.posted("chat/completions")]
    assert len(posted) == 2, report(proxy, f"{len(posted)} model calls, not 2 (call, answer)")
    first, second = posted
    assert first["tool_choice"] == {"type": "function", "function": {"name": FORCED_TOOL}}, \
        report(proxy, "the first call was not forced")
    # The call as the server streamed it back, as the agent sends it again in its history.
    assistant, tool_message = second["messages"][-2:]
    assert assistant["role"] == "assistant", report(proxy, "no assistant turn before the tool's")
    [call] = assistant["tool_calls"]
    assert call["function"]["name"] == FORCED_TOOL and call["id"], report(proxy, "the call")
    [tool] = [t for t in first["tools"] if t["function"]["name"] == FORCED_TOOL]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        tool["function"]["parameters"])
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == call["id"], \
        report(proxy, "the tool's result is not a tool message answering the call")
    assert "tool_choice" not in second, report(proxy, "the answer after the tool was forced")
    assert naut.replies and naut.replies[0], report(proxy, "no final answer streamed")
