"""%%mlx and %mlx in a real IPython shell: options, interpolation, and the magic against a
live server (answers, variables, chats, formats, commands)."""

import json
import re

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from mlx_jupyter.kernel.options import interpolate, parse_cell


@pytest.fixture(scope="module")
def shell():
    # A plain terminal-like shell, not one a kernel test left behind as the singleton.
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    yield shell
    InteractiveShell.clear_instance()


@pytest.fixture
def mlx(shell, live_server, monkeypatch):
    monkeypatch.setenv("MLX_JUPYTER_URL", live_server.url)
    monkeypatch.setenv("MLX_JUPYTER_TOKEN", live_server.token)
    shell.run_line_magic("load_ext", "mlx_jupyter")
    yield shell
    shell.run_line_magic("unload_ext", "mlx_jupyter")


def test_placeholders_come_from_the_namespace_and_unknown_ones_stay(shell):
    shell.run_cell("topic = 'tides'", store_history=True)
    shell.run_cell("6 * 7", store_history=True)
    number = shell.execution_count - 1
    text = interpolate(f"{{topic}} {{Out[{number}]}} {{In[{number}]}} {{missing}} {{Out[999]}} "
                       "{not a placeholder} {topic.upper()}", shell.user_ns)
    assert text == ("tides 42 6 * 7 {missing} {Out[999]} {not a placeholder} "
                    "{topic.upper()}")


def test_every_option_parses_and_interpolation_can_be_turned_off(shell):
    shell.user_ns["city"] = "Lisbon"
    request = parse_cell("-f json --priority 3 -o answer --chat --seed 1 --top-p 0.5",
                         "About {city}", "", shell.user_ns)
    assert (request.format, request.output, request.chat, request.model) == \
        ("json", "answer", "default", None)
    assert request.options == {"priority": 3, "seed": 1, "top_p": 0.5}
    assert request.prompt == "About Lisbon"
    kept = parse_cell("m --no-interpolate --chat trip", "About {city}", "", shell.user_ns)
    assert kept.prompt == "About {city}" and kept.chat == "trip" and kept.model == "m"


@pytest.mark.parametrize(("line", "says"), [
    ("-f pdf", "invalid choice: 'pdf'"),
    ("-o 1x", "'1x' is not a Python variable name"),
    ("-o class", "'class' is not a Python variable name"),
    ("--temperature 3", "3 is not in [0.0, 2.0]"),
    ("--top-p 0", "0 is not in (0.0, 1.0]"),
    ("--max-tokens 0", "0 is not in [1, 32768]"),
    ("--priority 5000", "5000 is not in [-1000, 1000]"),
    ("--chat 'a b'", "not a conversation name"),
    ("--stop ''", "--stop strings must not be empty"),
])
def test_bad_options_are_usage_errors(line, says):
    with pytest.raises(UsageError, match=re.escape(says)):
        parse_cell(line, "Hi", "demo")


def test_the_answer_goes_into_a_variable_and_a_chat_remembers(mlx, capsys, live_server):
    mlx.run_cell_magic("mlx", "demo --max-tokens 12 --temperature 0 -o first --chat walk",
                       "I am planning a walk by the sea.")
    printed = capsys.readouterr()
    assert printed.err == "" and mlx.user_ns["first"] in printed.out
    assert "demo · " in printed.out
    mlx.run_cell_magic("mlx", "demo --max-tokens 12 --temperature 0 --chat walk -o second",
                       "What should I bring?")
    magics = mlx.magics_manager.registry["MlxMagics"]
    assert [m["role"] for m in magics.conversations["walk"]] == \
        ["user", "assistant", "user", "assistant"]
    assert magics.conversations["walk"][1]["content"] == mlx.user_ns["first"]
    mlx.run_line_magic("mlx", "chat reset walk")
    assert "walk" not in magics.conversations and "forgot walk" in capsys.readouterr().out


def test_code_goes_to_the_next_input_and_bad_json_is_reported(mlx, capsys):
    mlx.run_cell_magic("mlx", "demo -f code --max-tokens 8 --temperature 0", "Write code.")
    assert mlx.rl_next_input  # the answer, for a new cell below
    capsys.readouterr()
    mlx.run_cell_magic("mlx", "demo -f json --max-tokens 8 --temperature 0 --no-stream",
                       "Say hi.")
    assert "the answer is not valid JSON" in capsys.readouterr().err


def test_commands_print_tables_and_errors_are_one_line(mlx, capsys):
    mlx.run_line_magic("mlx", "load demo")
    assert capsys.readouterr().out.startswith("demo: loaded, pid ")
    mlx.run_line_magic("mlx", "list")
    listed = capsys.readouterr().out
    assert "model" in listed and "demo" in listed  # the text form of the table
    assert "live memory" in listed
    mlx.run_line_magic("mlx", "status")
    shown = capsys.readouterr().out
    # The estimate it is counted for beside what its worker holds (its own report).
    assert re.search(r"demo: loaded \(pid \d+; estimate \d+\.\d\d GB, live \d+\.\d\d GB",
                     shown)
    assert "database" not in shown  # open: nothing to say
    mlx.run_line_magic("mlx", "settings")
    assert "default_max_tokens" in capsys.readouterr().out
    for _ in range(2):  # two rows of its own for the history, whatever ran before
        mlx.run_cell_magic("mlx", "demo --max-tokens 2 --temperature 0 --no-stream", "Hi")
    capsys.readouterr()
    mlx.run_line_magic("mlx", "history 2")
    assert capsys.readouterr().out.count("\n") == 4  # header, rule, 2 rows
    mlx.run_line_magic("mlx", "cancel 0123")
    assert "no request with id '0123'" in capsys.readouterr().err
    for bad, says in [("load", "use %mlx load MODEL"), ("history many", "N from 1 to 500"),
                      ("status now", "takes no arguments"), ("frobnicate", "unknown command")]:
        mlx.run_line_magic("mlx", bad)
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1


def test_a_sampled_answer_records_the_seed_that_reproduces_it(mlx, capsys, live_server):
    from mlx_jupyter import Client

    prompt = "Tell me about the sea."
    with Client(live_server.url, live_server.token) as client:
        mlx.run_cell_magic("mlx", "demo --max-tokens 16 --temperature 1.0 -o first", prompt)
        [row] = client.history(1)
        seed = client.request(row["id"])["parameters"]["seed"]
        assert isinstance(seed, int)  # chosen by the server: no --seed was given
        mlx.run_cell_magic("mlx", f"demo --max-tokens 16 --temperature 1.0 --seed {seed} "
                                  f"-o again", prompt)
        assert mlx.user_ns["again"] == mlx.user_ns["first"] and mlx.user_ns["first"]
        mlx.run_cell_magic("mlx", "demo --max-tokens 2 --temperature 0", prompt)  # greedy
        [row] = client.history(1)
        assert client.request(row["id"])["parameters"]["seed"] is None
    assert capsys.readouterr().err == ""


def test_an_explicit_format_wins_over_the_configured_default(mlx, capsys):
    mlx.run_line_magic("config", "MlxMagics.default_format = 'json'")
    try:
        mlx.run_cell_magic("mlx", "demo -f markdown --max-tokens 4 --temperature 0", "Hi")
        assert capsys.readouterr().err == ""  # markdown, so not checked as JSON
        mlx.run_cell_magic("mlx", "demo --max-tokens 4 --temperature 0", "Hi")
        assert "the answer is not valid JSON" in capsys.readouterr().err
    finally:
        mlx.run_line_magic("config", "MlxMagics.default_format = 'markdown'")


def test_showing_the_panel_again_stops_the_previous_one(mlx, capsys):
    magics = mlx.magics_manager.registry["MlxMagics"]
    mlx.run_line_magic("mlx", "panel")
    first = magics._panel
    assert first.refreshing
    mlx.run_line_magic("mlx", "panel")
    assert magics._panel is not first and not first.refreshing and magics._panel.refreshing
    second = magics._panel
    mlx.run_line_magic("unload_ext", "mlx_jupyter")  # unloading closes it too
    try:
        assert not second.refreshing
    finally:
        mlx.run_line_magic("load_ext", "mlx_jupyter")
    assert capsys.readouterr().err == ""


def test_history_shows_what_a_chat_cell_asked_at_local_time(mlx, capsys):
    mlx.run_cell_magic("mlx", 'demo --max-tokens 2 --temperature 0 --system "Be brief."',
                       'Where is the "harbour"?')
    capsys.readouterr()
    mlx.run_line_magic("mlx", "history 1")
    header, rule, row = capsys.readouterr().out.splitlines()
    assert 'Where is the "harbour"?' in row and '"role"' not in row  # not the messages' JSON
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  demo ", row)  # no microseconds, no zone


def test_the_footer_and_the_history_show_the_stored_decode_speed(mlx, capsys, live_server):
    from mlx_jupyter import Client

    mlx.run_cell_magic("mlx", "demo --max-tokens 24 --temperature 0", "Tell me about the sea.")
    footer = capsys.readouterr().out.splitlines()[-1]
    with Client(live_server.url, live_server.token) as client:
        [row] = client.history(1)
    stored = f"{row['timings']['tokens_per_second']:.1f}"
    assert footer.startswith("[demo · ") and f" · {stored} tok/s" in footer
    mlx.run_line_magic("mlx", "history 1")
    header, rule, line = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["created", "model", "status", "tokens", "tok/s"]
    assert line.split()[3:6] == ["completed", str(row["completion_tokens"]), stored]


def test_resetting_an_unknown_conversation_says_so(mlx, capsys):
    mlx.run_line_magic("mlx", "chat reset nobody")
    captured = capsys.readouterr()
    assert "no conversation named 'nobody'" in captured.err and captured.out == ""


def test_the_footer_says_when_the_models_context_cut_max_tokens(mlx, capsys):
    # The demo's context is 256 positions: 1,000 tokens cannot fit after any prompt.
    mlx.run_cell_magic("mlx", "demo --max-tokens 1000 --temperature 0", "The sea")
    footer = capsys.readouterr().out.splitlines()[-1]
    cut = re.search(r"max tokens cut to (\d+) by the model's context", footer)
    assert cut and 0 < int(cut.group(1)) < 256, footer
    mlx.run_cell_magic("mlx", "demo --max-tokens 4 --temperature 0", "The sea")
    assert "cut to" not in capsys.readouterr().out


PERSON = ("import pydantic\n"
          "class Person(pydantic.BaseModel):\n"
          "    name: str = pydantic.Field(max_length=16)\n"
          "    age: int = pydantic.Field(ge=0, le=120)\n")


def test_a_schema_cell_gives_an_instance_shown_as_pretty_json(mlx, capsys):
    mlx.run_cell(PERSON)
    mlx.run_cell_magic("mlx", "demo --schema Person -o who --max-tokens 60 --temperature 0",
                       "Invent a person: a name and an age.")
    printed = capsys.readouterr()
    assert printed.err == ""
    who = mlx.user_ns["who"]
    assert type(who) is mlx.user_ns["Person"]
    assert json.dumps(who.model_dump(), indent=2) in printed.out
    mlx.run_cell("point_schema = {'type': 'object', 'required': ['x'], "
                 "'properties': {'x': {'type': 'integer', 'minimum': 0, 'maximum': 99}}, "
                 "'additionalProperties': False}")
    mlx.run_cell_magic("mlx", "demo --schema point_schema -o point --max-tokens 40 "
                              "--temperature 0 --no-stream", "A point.")
    assert capsys.readouterr().err == ""
    assert set(mlx.user_ns["point"]) == {"x"} and type(mlx.user_ns["point"]["x"]) is int


@pytest.mark.parametrize(("line", "says"), [
    ("demo --schema Person --max-tokens 3 --temperature 0",
     "the answer was cut at --max-tokens (3 tokens) before its JSON was complete; "
     "raise --max-tokens"),
    ("demo --schema Nobody", "--schema Nobody: the notebook has no variable 'Nobody'"),
    ("demo --schema pydantic.Field", "--schema pydantic.Field is <function Field"),
    ("demo --schema Person.nothing", "--schema Person.nothing: Person has no attribute"),
])
def test_a_schema_cell_that_cannot_answer_is_one_red_line(mlx, capsys, line, says):
    mlx.run_cell(PERSON)
    mlx.run_cell_magic("mlx", line, "Invent a person.")
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_bad_schema_options_reach_the_server_never(mlx, capsys, live_server):
    from mlx_jupyter import Client

    with Client(live_server.url, live_server.token) as client:
        before = client.history(1)
        for line in ("demo --schema Person -f code", "demo --top-logprobs 21",
                     "demo --min-p 2", "demo --repetition-penalty 0"):
            mlx.run_cell_magic("mlx", line, "Hi")
            assert capsys.readouterr().err.count("\n") == 1
        assert client.history(1) == before
