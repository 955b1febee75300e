"""The model registry: sources, validation of registered folders, resolution, scans, forget."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from model_factory import backdate, make_hf_cache_repo, make_model

from mlx_jupyter.errors import ModelNotFound
from mlx_jupyter.models import registry as registry_module
from mlx_jupyter.models.memory import MemoryEstimator
from mlx_jupyter.models.paths import InvalidModelPath
from mlx_jupyter.models.registry import (BUNDLED, DEMO_MODEL_PATH, FOLDER, HUGGINGFACE,
                                         REGISTERED, InvalidModelName, ModelEntry, ModelExists,
                                         ModelFilesMissing, ModelNotForgettable, ModelRegistry,
                                         check_name)

OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


@pytest.fixture
def roots(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    return allowed, outside


@pytest.fixture
def registry(roots):
    return ModelRegistry.with_bundled(allowed_roots=[roots[0]], hf_cache=False)


# -- bundled, get, resolve ------------------------------------------------------------------


def test_the_bundled_demo_is_listed_resolved_and_estimated(registry):
    entry = registry.get("demo")
    assert (entry.path, entry.source, entry.kind, entry.deletable) == (
        DEMO_MODEL_PATH, BUNDLED, "text", False)
    assert registry.names() == ["demo"] and registry.entries() == [entry]
    assert registry.resolve("demo") == DEMO_MODEL_PATH
    assert registry.estimate("demo").weight_bytes == 4461056
    info = registry.info("demo").to_dict()
    assert info["available"] and info["estimate_bytes"] == int(4461056 * 1.25)


def test_an_unknown_model_is_not_found(registry):
    with pytest.raises(ModelNotFound, match="unknown model 'nope'; available models: demo"):
        registry.get("nope")
    with pytest.raises(ModelNotFound):
        registry.resolve("nope")


# -- register: what is accepted -------------------------------------------------------------


def test_a_loadable_folder_under_a_root_is_registered(registry, roots):
    model = make_model(roots[0] / "tiny", shards=3)
    entry = registry.register("my/tiny-1.0", str(model.path))
    assert entry == ModelEntry("my/tiny-1.0", model.path, REGISTERED, "text")
    assert registry.names() == ["demo", "my/tiny-1.0"]
    assert registry.resolve("my/tiny-1.0") == model.path
    assert registry.estimate("my/tiny-1.0").weight_bytes == model.weight_bytes


def test_links_that_stay_inside_the_roots_are_accepted(registry, roots):
    model = make_model(roots[0] / "real")
    (roots[0] / "link").symlink_to(model.path)
    registry.register("linked", str(roots[0] / "link"))
    assert registry.resolve("linked") == model.path


def test_a_folder_that_validates_loads_in_mlx_lm(roots, tmp_path):
    """The validation's promise, checked once against the real loader in a subprocess."""
    model = make_model(roots[0] / "tiny", shards=2)
    ModelRegistry(allowed_roots=[roots[0]], hf_cache=False).register("tiny", str(model.path))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    code = "import sys, mlx_lm; mlx_lm.load(sys.argv[1]); print('loaded')"
    result = subprocess.run([sys.executable, "-c", code, str(model.path)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "loaded", result.stderr[-2000:]


# -- register: what is refused, and why -----------------------------------------------------


@pytest.mark.parametrize("path, why, status", [
    ("", "empty", 400),
    ("relative/model", "is relative; give an absolute path", 400),
    ("~/models/x", "starts with '~'", 400),
    ("{allowed}/../outside/m", "contains '..'", 400),
    ("{outside}/m", "is outside the allowed model roots", 403),
    ("{allowed}/missing", "does not exist", 404),
    ("{allowed}/file.txt", "is not a folder", 400),
    ("{allowed}/bad\x00name", "NUL byte", 400),
])
def test_unsafe_or_wrong_paths_are_refused(registry, roots, path, why, status):
    make_model(roots[1] / "m")
    (roots[0] / "file.txt").write_text("x")
    path = path.format(allowed=roots[0], outside=roots[1])
    with pytest.raises(InvalidModelPath, match=why) as excinfo:
        registry.register("m", path)
    assert excinfo.value.status == status and "\n" not in str(excinfo.value)
    assert registry.names() == ["demo"]


def test_a_link_to_a_folder_outside_the_roots_is_refused(registry, roots):
    model = make_model(roots[1] / "m")
    (roots[0] / "escape").symlink_to(model.path)
    with pytest.raises(InvalidModelPath, match=f"resolves to {model.path}, which is outside"):
        registry.register("m", str(roots[0] / "escape"))


def test_a_weight_file_linked_from_outside_the_roots_is_refused(registry, roots):
    outside = make_model(roots[1] / "m")
    model = make_model(roots[0] / "m")
    (model.path / "model.safetensors").unlink()
    (model.path / "model.safetensors").symlink_to(outside.path / "model.safetensors")
    with pytest.raises(InvalidModelPath, match="model.safetensors is a link to .*outside"):
        registry.register("m", str(model.path))


def test_nothing_is_allowed_without_roots(roots):
    model = make_model(roots[0] / "m")
    with pytest.raises(InvalidModelPath, match="allowed_model_roots"):
        ModelRegistry(hf_cache=False).register("m", str(model.path))


def _remove(*names):
    def change(path: Path):
        for name in names:
            (path / name).unlink()
    return change


def _write(name, content):
    def change(path: Path):
        (path / name).write_bytes(content)
    return change


@pytest.mark.parametrize("change, why", [
    (_remove("config.json"), "config.json is missing"),
    (_write("config.json", b"{oops"), "config.json is not valid JSON"),
    (_write("config.json", b'{"hidden_size": 8}'), "config.json has no model_type"),
    (_remove("model.safetensors"), r"no model\*.safetensors weight files"),
    (_remove("tokenizer.json"), "no tokenizer files"),
    (_write("model.safetensors", b"\xff" * 64), "corrupt safetensors header"),
])
def test_a_folder_mlx_lm_could_not_load_is_refused(registry, roots, change, why):
    model = make_model(roots[0] / "m")
    change(model.path)
    with pytest.raises(InvalidModelPath, match=f"is not a loadable model: .*{why}"):
        registry.register("m", str(model.path))


@pytest.mark.parametrize("name", ["", "../x", "a/../b", "a..b", "/abs", "a//b", "a/", ".hidden",
                                  "a/.b", "sp ace", "semi;colon", "x" * 257, "ünï"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidModelName):
        check_name(name)


@pytest.mark.parametrize("name", ["demo2", "mlx-community/Llama-3.2-1B-Instruct-4bit", "a_b.c",
                                  "x" * 256, "load", "org/loader",
                                  # Any last word: only POST reads it as an action.
                                  "org/load", "a/b/unload", "org/pin"])
def test_good_names_pass(name):
    assert check_name(name) == name


def test_a_taken_name_is_a_conflict(registry, roots):
    model = make_model(roots[0] / "m")
    registry.register("mine", str(model.path))
    for name in ("mine", "demo"):
        with pytest.raises(ModelExists, match=f"a model named '{name}' already exists") as error:
            registry.register(name, str(model.path))
        assert error.value.status == 409


def test_concurrent_registrations_of_one_name_let_exactly_one_win(registry, roots):
    model = make_model(roots[0] / "m")
    outcomes = []

    def register():
        try:
            registry.register("same", str(model.path))
            outcomes.append("ok")
        except ModelExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=register) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["exists"] * 5 + ["ok"]


# -- seeding from the database, and resolution ----------------------------------------------


def test_seeded_entries_are_trusted_until_resolved(registry, roots, tmp_path):
    registry.add(ModelEntry("old", tmp_path / "gone", REGISTERED))
    assert "old" in registry.names()
    with pytest.raises(ModelFilesMissing, match="the folder of model 'old' is gone") as error:
        registry.resolve("old")
    assert error.value.status == 404
    info = registry.info("old")
    assert not info.available and "is gone" in info.problem
    registry.add(ModelEntry("old", tmp_path / "gone", REGISTERED))  # seeding twice is fine
    with pytest.raises(ModelExists):
        registry.add(ModelEntry("old", tmp_path / "other", REGISTERED))


def test_a_seeded_entry_outside_the_roots_is_refused_when_resolved(registry, roots):
    model = make_model(roots[1] / "m")
    registry.add(ModelEntry("sneaky", model.path, REGISTERED))
    with pytest.raises(InvalidModelPath, match="outside the allowed model roots"):
        registry.resolve("sneaky")


def test_without_roots_registering_is_off_but_seeded_entries_still_resolve(roots):
    model = make_model(roots[1] / "m")
    registry = ModelRegistry(hf_cache=False)
    registry.add(ModelEntry("remembered", model.path, REGISTERED))
    assert registry.resolve("remembered") == model.path


def test_resolution_is_cached_until_the_folder_changes(registry, roots):
    model = make_model(roots[0] / "m")
    registry.register("m", str(model.path))
    for _ in range(3):
        assert registry.resolve("m") == model.path
    assert (registry.resolve_misses, registry.resolve_hits) == (1, 2)
    backdate(model.path, 30)  # a new mtime: something in the folder changed
    registry.resolve("m")
    assert (registry.resolve_misses, registry.resolve_hits) == (2, 2)


def test_a_link_swapped_to_outside_after_caching_is_refused(registry, roots):
    inside, outside = make_model(roots[0] / "real"), make_model(roots[1] / "real")
    link = roots[0] / "current"
    link.symlink_to(inside.path)
    registry.register("m", str(link))
    registry.resolve("m")
    link.unlink()
    link.symlink_to(outside.path)
    with pytest.raises(InvalidModelPath, match="outside the allowed model roots"):
        registry.resolve("m")


def test_a_removed_folder_is_reported_missing(registry, roots):
    model = make_model(roots[0] / "m")
    registry.register("m", str(model.path))
    registry.resolve("m")
    for path in model.path.iterdir():
        path.unlink()
    model.path.rmdir()
    with pytest.raises(ModelFilesMissing):
        registry.resolve("m")


# -- model_dirs -----------------------------------------------------------------------------


def test_model_dirs_list_each_model_subfolder(roots, tmp_path, monkeypatch):
    models = tmp_path / "models"
    make_model(models / "alpha")
    make_model(models / "demo")  # the bundled name is taken: listed as demo-2
    make_model(models / "my model")  # named with the space replaced
    make_model(models / "no-tokenizer", tokenizer=False)
    make_model(models / ".hidden")
    (models / "notes").mkdir()
    backdate(models)
    registry = ModelRegistry.with_bundled(model_dirs=[models], hf_cache=False)
    result = registry.refresh()
    assert registry.names() == ["alpha", "demo", "demo-2", "my-model"]
    assert {e.name for e in result.added} == {"alpha", "demo-2", "my-model"}
    assert registry.get("alpha").source == FOLDER
    assert registry.resolve("demo-2") == models / "demo"
    assert registry.resolve("demo") == DEMO_MODEL_PATH

    inspected = []
    monkeypatch.setattr(registry_module, "_folder_entry",
                        lambda folder: inspected.append(folder))
    assert not registry.refresh().changed
    assert inspected == []  # nothing changed: no subfolder was read again


def test_model_dirs_notice_new_and_removed_models(tmp_path):
    models = tmp_path / "models"
    make_model(models / "alpha")
    registry = ModelRegistry(model_dirs=[models, tmp_path / "absent"], hf_cache=False)
    registry.refresh()
    make_model(models / "beta")
    (models / "alpha" / "config.json").unlink()
    backdate(models / "alpha", 30)
    result = registry.refresh()
    assert registry.names() == ["beta"]
    assert [e.name for e in result.added] == ["beta"]
    assert [e.name for e in result.removed] == ["alpha"]


# -- the Hugging Face cache -----------------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path):
    cache = tmp_path / "hub"
    tiny = make_model(tmp_path / "src" / "tiny")
    no_tokenizer = make_model(tmp_path / "src" / "partial", tokenizer=False)
    make_hf_cache_repo(cache, "mlx-community/Tiny-4bit", tiny.path)
    make_hf_cache_repo(cache, "someone/partial", no_tokenizer.path)
    make_hf_cache_repo(cache, "someone/data", tiny.path, repo_type="dataset")
    backdate(cache)
    return cache, tiny


def test_mlx_repos_in_the_hugging_face_cache_are_listed(roots, hf_cache):
    cache, tiny = hf_cache
    registry = ModelRegistry.with_bundled(hf_cache_dir=cache)
    registry.refresh()
    assert registry.names() == ["demo", "mlx-community/Tiny-4bit"]
    entry = registry.get("mlx-community/Tiny-4bit")
    assert (entry.source, entry.deletable, entry.repo_id, entry.kind) == (
        HUGGINGFACE, True, "mlx-community/Tiny-4bit", "text")
    assert registry.estimate(entry.name).weight_bytes == tiny.weight_bytes  # links followed
    assert registry.resolve(entry.name) == entry.path
    assert not registry.refresh().changed


def test_the_hugging_face_cache_is_scanned_again_only_when_it_changes(hf_cache, monkeypatch,
                                                                       tmp_path):
    cache, tiny = hf_cache
    registry = ModelRegistry(hf_cache_dir=cache)
    registry.refresh()
    scans = []
    monkeypatch.setattr(registry_module, "_hf_cache_entries",
                        lambda cache_dir: scans.append(cache_dir) or [])
    registry.refresh()
    assert scans == []
    make_hf_cache_repo(cache, "mlx-community/Other", tiny.path)
    registry.refresh()
    assert scans == [cache]


def test_a_missing_hugging_face_cache_is_not_an_error(tmp_path):
    registry = ModelRegistry.with_bundled(hf_cache_dir=tmp_path / "no-such-cache")
    assert not registry.refresh().changed and registry.names() == ["demo"]


# -- forget ---------------------------------------------------------------------------------


def test_forgetting_a_registered_model_frees_its_name_and_keeps_its_files(registry, roots):
    model = make_model(roots[0] / "m")
    registry.register("m", str(model.path))
    forgotten = registry.forget("m")
    assert forgotten.name == "m" and registry.names() == ["demo"]
    assert model.path.is_dir()
    registry.register("m", str(model.path))


@pytest.mark.parametrize("name, delete_files, why", [
    ("demo", False, "bundled demo model; it cannot be forgotten"),
    ("demo", True, "only models downloaded to the Hugging Face cache"),
    ("alpha", False, "configured model folder"),
    ("mine", True, "only models downloaded to the Hugging Face cache"),
    ("mlx-community/Tiny-4bit", False, "delete its files to forget it"),
])
def test_forget_refuses_what_it_may_not_do(roots, tmp_path, hf_cache, name, delete_files, why):
    make_model(tmp_path / "models" / "alpha")
    registry = ModelRegistry.with_bundled(model_dirs=[tmp_path / "models"],
                                          allowed_roots=[roots[0]], hf_cache_dir=hf_cache[0])
    registry.register("mine", str(make_model(roots[0] / "mine").path))
    registry.refresh()
    with pytest.raises(ModelNotForgettable, match=why) as error:
        registry.forget(name, delete_files=delete_files)
    assert error.value.status == 409  # where the model comes from forbids it
    assert name in registry.names()


def test_deleting_a_downloaded_model_removes_it_from_the_cache(hf_cache):
    cache, _ = hf_cache
    registry = ModelRegistry(hf_cache_dir=cache, estimator=MemoryEstimator())
    registry.refresh()
    registry.estimate("mlx-community/Tiny-4bit")
    registry.forget("mlx-community/Tiny-4bit", delete_files=True)
    assert not (cache / "models--mlx-community--Tiny-4bit").exists()
    assert (cache / "models--someone--partial").exists()
    assert registry.names() == []
    assert not registry.refresh().changed
    assert registry.estimator.stats()["entries"] == 0


def test_infos_describe_every_model_for_the_listing(registry, roots, tmp_path):
    model = make_model(roots[0] / "m", extra_files=2)
    registry.register("m", str(model.path))
    registry.add(ModelEntry("gone", tmp_path / "gone", REGISTERED))
    listing = {info["name"]: info for info in (i.to_dict() for i in registry.infos())}
    assert listing["m"]["weight_bytes"] == model.weight_bytes
    assert listing["m"]["size_bytes"] == sum(p.stat().st_size for p in model.path.iterdir())
    assert listing["m"]["available"] and listing["m"]["problem"] is None
    assert not listing["gone"]["available"] and listing["gone"]["estimate_bytes"] is None
    json.dumps(listing)  # ready to render
