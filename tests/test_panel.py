"""The control panel's own widgets and click handlers, against a live server."""

import os
import signal
import time

import pytest

from mlx_jupyter import Client, panel


@pytest.fixture
def client(live_server):
    with Client(live_server.url, live_server.token) as client:
        yield client


@pytest.fixture
def control(client):
    shown = panel(client, refresh_seconds=0)  # refreshed by hand: no thread in the way
    yield shown
    shown.close()


def wait_until(check, seconds=60):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the panel never got there"
        time.sleep(0.05)


def test_model_buttons_load_pin_and_unload(control, client):
    buttons = control.models_tab.buttons["demo"]
    buttons["load"].click()
    assert client.model("demo")["status"] == "loaded"
    assert buttons["load"].disabled and not buttons["unload"].disabled
    label = control.models_tab._labels["demo"].value
    assert "loaded" in label and "estimate" in label and "live" in label
    assert control.models_tab.memory.value > 0
    buttons["pin"].click()
    assert client.model("demo")["pinned"] is True and buttons["pin"].disabled
    buttons["unpin"].click()
    buttons["unload"].click()
    assert client.model("demo")["status"] == "unloaded"
    assert not buttons["load"].disabled and control.message.value == "demo: unloaded"


def test_the_playground_streams_an_answer_equal_to_the_api(control, client):
    playground = control.playground
    playground.model.value = "demo"
    playground.prompt.value = "Tell me about the sea."
    playground.max_tokens.value = "16"
    playground.temperature.value = "0"
    playground.generate.click()
    playground.wait(120)
    expected = client.generate(messages=[{"role": "user", "content": "Tell me about the sea."}],
                               model="demo", max_tokens=16, temperature=0)
    assert playground.answer.value == expected.text and expected.text
    assert playground.footer.value.startswith("demo · ")
    assert not playground.generate.disabled and playground.stop_button.disabled
    assert "seed" not in playground.footer.value  # greedy: nothing to seed
    control.refresh()
    assert "Tell me about the sea." in control.history_tab.table.value

    playground.temperature.value = "1.0"  # sampled: the footer shows the seed the server used
    playground.generate.click()
    playground.wait(120)
    seed = int(playground.footer.value.rsplit("· seed ", 1)[1])
    [row] = client.history(1)
    assert client.request(row["id"])["parameters"]["seed"] == seed
    sampled = playground.answer.value
    playground.seed.value = str(seed)  # that seed again: the same answer
    playground.generate.click()
    playground.wait(120)
    assert playground.answer.value == sampled and f"· seed {seed}" in playground.footer.value
    # The history shows the decode speed as stored, the one the footer showed.
    stored = client.history(1)[0]["timings"]["tokens_per_second"]
    assert f"{stored:.1f} tok/s" in playground.footer.value
    control.refresh()
    assert f"<td>{stored:.1f}</td>" in control.history_tab.table.value


def test_the_playground_sends_only_what_is_filled_in(control, client):
    playground = control.playground
    playground.prompt.value = "The sea"
    playground.max_tokens.value = "many"
    playground.generate.click()
    assert control.message.value == "max tokens must be a whole number from 1 to 32768, not 'many'"
    before = client.settings()["default_max_tokens"]["value"]
    client.set_setting("default_max_tokens", 3)
    try:
        playground.max_tokens.value = ""  # the server's default_max_tokens, and its model
        playground.generate.click()
        playground.wait(120)
        [row] = client.history(1)
        assert row["model"] == "demo" and row["completion_tokens"] <= 3
        assert client.request(row["id"])["parameters"]["max_tokens"] == 3
    finally:
        client.set_setting("default_max_tokens", before)


def test_stop_cancels_the_generation_on_the_server(control, client):
    client.load("demo")
    pid = client.model("demo")["pid"]
    playground = control.playground
    playground.model.value, playground.prompt.value = "demo", "The sea"
    playground.max_tokens.value = "4000"
    os.kill(pid, signal.SIGSTOP)  # nothing is generated until the stop has happened
    try:
        playground.generate.click()
        wait_until(lambda: playground._events is not None)
        request_id = playground._events.request_id
        control.refresh()
        assert request_id in control.queue_tab.table.value  # it is running
        playground.stop_button.click()
    finally:
        os.kill(pid, signal.SIGCONT)
    playground.wait(30)
    assert client.request(request_id)["status"] == "cancelled"
    assert "· cancelled" in playground.footer.value and playground._thread.is_alive() \
        is False


def test_errors_show_in_the_panel_and_cancel_needs_an_id(control):
    control.models_tab._act("no-such-model", "load")
    assert "unknown model 'no-such-model'" in control.message.value
    control.queue_tab.cancel.click()
    assert control.message.value == "give the id of the request to cancel"
    control.queue_tab.request_id.value = "0" * 32
    control.queue_tab.cancel.click()
    assert "no request with id" in control.message.value
    control.playground.prompt.value = ""
    control.playground.generate.click()
    assert control.message.value == "write a prompt first"


def test_settings_are_saved_from_the_panel(control, client):
    settings = control.settings_tab
    before = client.settings()["default_max_tokens"]["value"]
    try:
        settings.key.value = "default_max_tokens"
        settings.value.value = "99"
        settings.save.click()
        assert client.settings()["default_max_tokens"]["value"] == 99
        assert "99" in settings.table.value
        settings.value.value = "many"
        settings.save.click()
        assert control.message.value == "default_max_tokens takes a value of type int, not 'many'"
    finally:
        client.set_setting("default_max_tokens", before)


def test_the_panel_refreshes_itself_until_it_is_closed(client):
    shown = panel(client, refresh_seconds=0.05)
    try:
        assert shown.refreshing
        job = client.submit("The river", model="demo", max_tokens=4)
        client.result(job, timeout=60)
        wait_until(lambda: "The river" in shown.history_tab.table.value)  # by itself
    finally:
        shown.close()
    assert not shown.refreshing
