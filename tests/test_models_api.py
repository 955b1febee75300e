"""Model routes on a real server: listing, registration rules, load, pin, unload, forget."""

import json

import psutil
import pytest
from tornado.httpclient import HTTPClientError

from model_factory import make_model


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    scanned = tmp_path_factory.mktemp("model-dirs")
    outside = tmp_path_factory.mktemp("outside")
    make_model(scanned / "scanned-one")
    make_model(root / "mine")
    make_model(root / "no-tokenizer", tokenizer=False)
    make_model(outside / "elsewhere")
    (root / "link-out").symlink_to(outside / "elsewhere")
    return {"root": root, "scanned": scanned, "outside": outside}


@pytest.fixture
def jp_server_config(model_folders):
    return {"ServerApp": {"jpserver_extensions": {"mlx_jupyter": True}},
            "MlxApp": {"allowed_model_roots": [str(model_folders["root"])],
                       "model_dirs": [str(model_folders["scanned"])],
                       "scan_huggingface_cache": False}}


async def call(jp_fetch, *path, method="GET", body=None, params=None):
    response = await jp_fetch("mlx", "api", "models", *path, method=method, params=params,
                              body=None if body is None else json.dumps(body),
                              allow_nonstandard_methods=True, request_timeout=120)
    return response.code, json.loads(response.body)


async def refused(jp_fetch, *path, method="GET", body=None, params=None):
    with pytest.raises(HTTPClientError) as excinfo:
        await call(jp_fetch, *path, method=method, body=body, params=params)
    return excinfo.value.code, json.loads(excinfo.value.response.body)["message"]


async def test_listing_shows_bundled_and_scanned_models_with_estimates(jp_fetch):
    _, answer = await call(jp_fetch)
    models = {m["name"]: m for m in answer["models"]}
    assert set(models) == {"demo", "scanned-one"}
    assert models["demo"]["source"] == "bundled" and models["scanned-one"]["source"] == "folder"
    for model in models.values():
        assert model["status"] == "unloaded" and model["available"] is True
        assert model["estimate_bytes"] == pytest.approx(model["weight_bytes"] * 1.25, abs=1)


async def test_a_folder_under_an_allowed_root_registers_and_serves(jp_fetch, model_folders):
    code, model = await call(jp_fetch, method="POST",
                             body={"name": "mine", "path": str(model_folders["root"] / "mine")})
    assert code == 201 and model["source"] == "registered" and model["status"] == "unloaded"

    _, model = await call(jp_fetch, "mine", "load", method="POST", body={})
    assert model["status"] == "loaded" and psutil.pid_exists(model["pid"])
    assert model["rss_bytes"] > 0
    _, model = await call(jp_fetch, "mine", "pin", method="POST", body={})
    assert model["pinned"] is True
    status = json.loads((await jp_fetch("mlx", "api", "status")).body)
    assert [m["name"] for m in status["models"]["loaded"]] == ["mine"]
    assert status["memory"]["used_by_models"] == model["budget_bytes"]
    # Counted for its weights (× the overhead), its prompt cache, its KV reservation (8 slots
    # of 4,096 tokens by default) and its worker process.
    assert model["footprint"] == {
        "model_bytes": model["estimate_bytes"], "prompt_cache_bytes": 256 * 1024**2,
        "kv_reserve_bytes": 8 * 4096 * model["kv_bytes_per_token"],
        "worker_bytes": 96 * 1024**2, "total_bytes": model["budget_bytes"]}
    assert model["budget_bytes"] == sum(v for k, v in model["footprint"].items()
                                        if k != "total_bytes")

    _, unloaded = await call(jp_fetch, "mine", "unload", method="POST", body={})
    assert unloaded["status"] == "unloaded" and not psutil.pid_exists(model["pid"])

    _, forgotten = await call(jp_fetch, "mine", method="DELETE")
    assert forgotten == {"name": "mine", "source": "registered", "deleted_files": False}
    _, answer = await call(jp_fetch)
    assert "mine" not in {m["name"] for m in answer["models"]}
    assert (model_folders["root"] / "mine" / "config.json").exists()  # files untouched


@pytest.mark.parametrize("name, path, code, words", [
    ("x", "{outside}/elsewhere", 403, ["allowed"]),
    ("x", "{root}/../{outside_name}/elsewhere", 400, [".."]),
    ("x", "{root}/link-out", 403, ["allowed"]),
    ("x", "{root}/no-tokenizer", 400, ["tokenizer"]),
    ("x", "{root}/missing", 404, ["missing"]),
    ("x", "mine", 400, ["absolute"]),
    ("../x", "{root}/mine", 400, ["not allowed"]),
    ("demo", "{root}/mine", 409, ["already exists"]),
])
async def test_unsafe_or_unloadable_folders_are_refused_saying_why(jp_fetch, model_folders,
                                                                  name, path, code, words):
    path = path.format(root=model_folders["root"], outside=model_folders["outside"],
                       outside_name=model_folders["outside"].name)
    status, message = await refused(jp_fetch, method="POST", body={"name": name, "path": path})
    assert status == code and all(word in message for word in words), message


async def test_forget_and_load_refusals(jp_fetch):
    # 409: where the model comes from forbids it, not the request's form.
    code, message = await refused(jp_fetch, "demo", method="DELETE")
    assert code == 409 and "bundled" in message
    code, message = await refused(jp_fetch, "demo", method="DELETE",
                                  params={"delete_files": "true"})
    assert code == 409 and "cannot be deleted" in message
    code, message = await refused(jp_fetch, "nope", "load", method="POST", body={})
    assert code == 404 and "nope" in message
    code, message = await refused(jp_fetch, "nope", method="DELETE")
    assert code == 404


async def test_a_generation_loads_its_model_and_counts_the_use(jp_fetch):
    await jp_fetch("mlx", "api", "generate", method="POST", request_timeout=120,
                   body=json.dumps({"model": "scanned-one", "prompt": "Hi", "max_tokens": 2}))
    _, model = await call(jp_fetch, "scanned-one")
    assert model["status"] == "loaded" and model["active_requests"] == 0
    assert model["use_count"] == 1 and model["last_used_at"]


async def test_names_may_hold_a_slash_and_end_in_an_action_word(jp_fetch, model_folders):
    """The whole rest of the path is the name for GET and DELETE; only POST reads its last
    segment as an action. org/pin and org/load are names like any other."""
    for name in ("org/pin", "org/load"):
        code, model = await call(jp_fetch, method="POST",
                                 body={"name": name, "path": str(model_folders["root"] / "mine")})
        assert code == 201 and model["name"] == name
    for name in ("org/pin", "org/load"):
        assert (await call(jp_fetch, *name.split("/")))[1]["name"] == name
        v1 = json.loads((await jp_fetch("mlx", "v1", "models", *name.split("/"))).body)
        assert v1["id"] == name
        _, loaded = await call(jp_fetch, *name.split("/"), "load", method="POST", body={})
        assert loaded["name"] == name and loaded["status"] == "loaded"
    _, pinned = await call(jp_fetch, "org", "pin", "pin", method="POST", body={})
    assert pinned["name"] == "org/pin" and pinned["pinned"] is True
    # POST .../org/pin pins the model "org", which there is none of.
    code, message = await refused(jp_fetch, "org", "pin", method="POST", body={})
    assert code == 404 and "'org'" in message
    for name in ("org/pin", "org/load"):
        _, forgotten = await call(jp_fetch, *name.split("/"), method="DELETE")
        assert forgotten == {"name": name, "source": "registered", "deleted_files": False}
        code, _ = await refused(jp_fetch, *name.split("/"))
        assert code == 404
