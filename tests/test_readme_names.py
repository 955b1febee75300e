"""The README and the code agree on every public name: traits, settings, routes, magics,
metrics and model kinds. A name renamed on one side only fails here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tornado.routing import PathMatches
from tornado.web import RequestHandler

from mlx_jupyter.api.routes import ROUTES
from mlx_jupyter.app import MlxApp
from mlx_jupyter.contracts.status import Status
from mlx_jupyter.kernel.magics import COMMANDS, MlxMagics
from mlx_jupyter.models.memory import KIND_OVERHEADS
from mlx_jupyter.models.registry import BUNDLED, FOLDER, HUGGINGFACE, REGISTERED
from mlx_jupyter.store.settings import SETTINGS


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(title: str) -> str:
    """The README's text under a heading, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.M)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def test_every_trait_in_the_readme_exists_and_every_trait_is_in_its_table():
    own = set(MlxApp.class_own_traits(config=True))
    mentioned = set(re.findall(r"c\.MlxApp\.(\w+)", README))
    assert mentioned - own == set(), "the README names traits MlxApp lacks"
    table = section("Configuration")
    # A row may give two traits: `c.MlxApp.db_pool_size` / `db_max_overflow`.
    in_table = set(re.findall(r"^\| `c\.MlxApp\.(\w+)`(?: / `(\w+)`)?", table, re.M))
    in_table = {name for row in in_table for name in row if name}
    assert own - in_table == set(), "traits missing from the README's configuration table"


def test_every_magic_trait_in_the_readme_exists():
    mentioned = set(re.findall(r"MlxMagics\.(\w+)", README))
    assert mentioned, "the README documents MlxMagics' options"
    assert mentioned - set(MlxMagics.class_traits()) == set()


def test_the_readmes_settings_are_the_stored_settings():
    text = section("REST API")
    listed = re.search(r"Settings: (.*?)\(0 for both", text, re.S)
    assert listed, "the README lists the settings after 'Settings:'"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(SETTINGS)


def _concrete(path: str) -> str:
    """A README path with its placeholders filled, as a client would send it."""
    path = path.split("?")[0]
    return re.sub(r"\{(\w+)\}", lambda m: {"key": "default_model"}.get(m.group(1), "x1"), path)


def _handler_for(path: str) -> type | None:
    for pattern, handler in ROUTES:
        if PathMatches(pattern).regex.fullmatch(path):  # tornado matches whole paths only
            return handler
    return None


def _documented_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the README writes as `METHOD mlx/...`, with the methods
    and extra actions it writes beside it (`GET`/`DELETE mlx/...`, `.../load`, `/unload`)."""
    found = []
    for line in README.splitlines():
        for methods, path, extras in re.findall(
                r"((?:`(?:GET|POST|PUT|DELETE)`\s*/\s*)*)`((?:GET|POST|PUT|DELETE) mlx/[^`]*)`"
                r"((?:,\s*`/\w+`)*)", line):
            method, _, route = path.partition(" ")
            for other in re.findall(r"`(GET|POST|PUT|DELETE)`", methods) + [method]:
                found.append((other, route))
            base = route.rsplit("/", 1)[0]
            found += [(method, f"{base}{extra}") for extra in re.findall(r"`(/\w+)`", extras)]
    return found


def test_every_route_in_the_readme_exists_with_its_method():
    routes = _documented_routes()
    assert len(routes) > 20, routes
    for method, path in routes:
        handler = _handler_for(_concrete(path))
        assert handler is not None, f"README: {method} {path} matches no route"
        assert getattr(handler, method.lower()) is not getattr(RequestHandler, method.lower()), \
            f"README: {method} {path}: {handler.__name__} does not answer {method}"


def test_every_magic_command_in_the_readme_is_in_the_magics_help():
    documented = set(re.findall(r"`%mlx (\w+)", README))
    assert documented, "the README documents %mlx commands"
    helped = set(re.findall(r"^%mlx (\w+)", COMMANDS, re.M))
    # `%mlx load|unload|pin|unpin MODEL` is one help line for four commands.
    helped |= {word for line in re.findall(r"^%mlx ([\w|]+)", COMMANDS, re.M)
               for word in line.split("|")}
    assert documented - helped == set()


def test_the_readmes_model_kinds_and_sources_are_the_codes():
    assert set(re.findall(r'"(\w+)": 1\.\d+', section("Configuration"))) == set(KIND_OVERHEADS)
    models_row = re.search(r"^\| `GET mlx/api/models` \|(.*)$", README, re.M).group(1)
    listed = {name: set(re.findall(r"`(\w+)`", group)) for name, group in
              re.findall(r"(kind|source) \(([^)]*)\)", models_row)}
    assert listed["kind"] == set(KIND_OVERHEADS)
    assert listed["source"] == {BUNDLED, FOLDER, HUGGINGFACE, REGISTERED}


@pytest.fixture(scope="module")
def metrics_text(live_server):
    # The pool's gauges exist once the database is open (off the start path): a settings
    # read waits for that.
    assert live_server.get("mlx/api/settings").status_code == 200
    answer = live_server.get("mlx/metrics")
    assert answer.status_code == 200, answer.text
    return answer.text


def test_every_metric_in_the_readme_is_exported(metrics_text):
    table = section("Metrics")
    documented = {name for row in re.findall(r"^\| ([^|]+)\|", table, re.M)
                  for name in re.findall(r"`(\w+)`", row)}
    assert len(documented) > 20, documented
    exported = set(re.findall(r"^# TYPE mlx_jupyter_(\w+) ", metrics_text, re.M))
    # prometheus_client's TYPE line drops a counter's _total.
    exported |= {f"{name}_total" for name in exported}
    assert documented - exported == set()


def _outline(text: str) -> object:
    """The README's outline of an answer, `{"a", "b": {"c"}, "d": [{"e"}]}`, as JSON with
    null for a key given alone."""
    return json.loads(re.sub(r'"(\w+)"(?=\s*[,}])', r'"\1": null', text))


def _fields(model: type, outline: object) -> None:
    """Checks an outline against a pydantic model: the same keys, and nested outlines against
    the models of their fields."""
    assert isinstance(outline, dict)
    assert set(outline) == set(model.model_fields), model.__name__
    for key, inner in outline.items():
        if inner is None:
            continue
        annotation = model.model_fields[key].annotation
        while getattr(annotation, "__args__", None):  # list[ModelState] -> ModelState
            annotation = annotation.__args__[0]
            inner = inner[0] if isinstance(inner, list) else inner
        _fields(annotation, inner)


def test_the_readmes_status_outline_is_the_status_answer():
    outline = re.search(r"`GET mlx/api/status` answers `(\{.*?\})`:", README, re.S).group(1)
    _fields(Status, _outline(outline))


def test_the_fields_accepted_and_ignored_are_exactly_those_the_readme_lists():
    from mlx_jupyter.api.schemas import ACCEPTED_AND_IGNORED

    paragraph = re.search(r"Fields that change nothing here are accepted and ignored.*?\n\n",
                          section("OpenAI-compatible API"), re.S)
    assert paragraph, "the README's OpenAI section lists no accepted-and-ignored fields"
    listed = set(re.findall(r"`(\w+)`", paragraph.group(0))) - {"ACCEPTED_AND_IGNORED"}
    assert listed == set(ACCEPTED_AND_IGNORED)
