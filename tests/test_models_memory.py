"""Weight sizes from safetensors headers, cached estimates, system memory and the budget."""

import json
import os
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest
from model_factory import backdate, make_model

from mlx_jupyter.models import memory
from mlx_jupyter.models.memory import (InvalidMemoryBudget, InvalidModelFiles, MemoryEstimator,
                                       RssSampler, budget_bytes, model_kind, process_rss,
                                       system_memory,
                                       weight_bytes)

GIB = 1024**3


# -- weight bytes ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"dtype": "float16"}, {"shards": 5, "layers": 3},
                                     {"hidden": 96, "layers": 1, "dtype": "float16"}])
def test_weight_bytes_are_the_exact_tensor_bytes(tmp_path, options):
    model = make_model(tmp_path / "m", **options)
    assert weight_bytes(model.path) == model.weight_bytes


def test_weight_bytes_of_the_bundled_demo_are_its_file_minus_the_header():
    demo = memory.Path(memory.__file__).parent.parent / "demo"
    data = (demo / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert weight_bytes(demo) == len(data) - 8 - header_len


def test_a_shard_listed_in_the_index_but_missing_is_refused(tmp_path):
    model = make_model(tmp_path / "m", shards=3)
    model.weight_files[1].unlink()
    with pytest.raises(InvalidModelFiles, match="lists 1 weight file.*missing"):
        weight_bytes(model.path)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidModelFiles, match="no .safetensors weight files"):
        weight_bytes(tmp_path)


def _header_file(path, header: object, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_a_file_shorter_than_a_header_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\1\2\3")
    with pytest.raises(InvalidModelFiles, match="model.safetensors is not a safetensors file: "
                                                "only 3 bytes long"):
        weight_bytes(tmp_path)


@pytest.mark.parametrize("header, data, length, why", [
    (b"{not json", b"", None, "not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"", None,
     "data offsets outside the file"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "do not match its dtype and shape"),
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None,
     "invalid shape"),
    (b"{}", b"", 10**12, "claims 1000000000000 header bytes"),
])
def test_a_corrupt_header_is_refused_with_the_reason(tmp_path, header, data, length, why):
    path = tmp_path / "model.safetensors"
    _header_file(path, header, data, length)
    with pytest.raises(InvalidModelFiles, match=why) as excinfo:
        weight_bytes(tmp_path)
    assert "\n" not in str(excinfo.value) and "model.safetensors" in str(excinfo.value)


def test_metadata_and_packed_dtypes_count_correctly(tmp_path):
    _header_file(tmp_path / "model.safetensors",
                 {"__metadata__": {"format": "mlx"},
                  "a": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]},
                  "b": {"dtype": "F4", "shape": [3], "data_offsets": [30, 32]},
                  "c": {"dtype": "U32", "shape": [], "data_offsets": [32, 36]}}, b"\0" * 36)
    assert weight_bytes(tmp_path) == 36


# -- kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("config, kind", [
    ({"model_type": "llama"}, "text"),
    ({}, "text"),
    ({"model_type": "whisper"}, "audio"),
    ({"n_mels": 80, "n_audio_ctx": 1500}, "audio"),  # mlx-community whisper exports
    ({"model_type": "x", "architectures": ["Wav2Vec2ForCTC"]}, "audio"),
    ({"model_type": "qwen2_vl", "vision_config": {}}, "vision"),
])
def test_model_kind_comes_from_the_config(tmp_path, config, kind):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_kind(tmp_path) == kind


@pytest.mark.parametrize("content, why", [(None, "config.json is missing"),
                                          ("{", "not valid JSON"), ("[]", "not a JSON object")])
def test_a_bad_config_is_refused(tmp_path, content, why):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(InvalidModelFiles, match=why):
        model_kind(tmp_path)


# -- estimates ------------------------------------------------------------------------------


def test_the_estimate_is_the_weight_bytes_times_the_overhead_of_the_kind(tmp_path):
    text = make_model(tmp_path / "text", hidden=64, layers=2, extra_files=3)
    config = {"model_type": "whisper"}
    audio = make_model(tmp_path / "audio", hidden=32, layers=1, config=config)
    estimator = MemoryEstimator()
    estimate = estimator.estimate(text.path)
    assert (estimate.weight_bytes, estimate.kind, estimate.overhead, estimate.files) == (
        text.weight_bytes, "text", 1.25, 1)
    assert estimate.estimate_bytes == int(text.weight_bytes * 1.25)
    assert estimate.size_on_disk == sum(p.stat().st_size for p in text.path.iterdir())
    assert estimator.estimate(audio.path).estimate_bytes == int(audio.weight_bytes * 1.15)


def test_overheads_are_configurable_and_unknown_kinds_use_the_text_overhead(tmp_path):
    model = make_model(tmp_path / "m", config={"model_type": "llama", "vision_config": {}})
    estimator = MemoryEstimator(overheads={"text": 2.0, "audio": 1.5})
    estimate = estimator.estimate(model.path)
    assert (estimate.kind, estimate.overhead) == ("vision", 2.0)
    assert estimate.estimate_bytes == model.weight_bytes * 2


def test_a_second_estimate_is_a_cache_hit(tmp_path):
    model = make_model(tmp_path / "m")
    estimator = MemoryEstimator()
    first = estimator.estimate(model.path)
    assert estimator.estimate(str(model.path) + "/") == first  # one entry per resolved folder
    assert estimator.stats() == {"hits": 1, "misses": 1, "invalidations": 0,
                                 "expirations": 0, "entries": 1}


def test_a_weight_file_rewritten_in_place_invalidates_the_estimate(tmp_path):
    model = make_model(tmp_path / "m", hidden=64)
    estimator = MemoryEstimator()
    estimator.estimate(model.path)
    make_model(tmp_path / "m", hidden=96, age_seconds=30)  # same file names, new sizes
    assert estimator.estimate(model.path).weight_bytes == make_model(
        tmp_path / "other", hidden=96).weight_bytes
    assert estimator.stats()["invalidations"] == 1


def test_an_added_shard_invalidates_the_estimate(tmp_path):
    model = make_model(tmp_path / "m", shards=2, layers=2)
    estimator = MemoryEstimator()
    before = estimator.estimate(model.path)
    # A stray weight file, as a half-finished copy would leave, with the folder's mtime moved.
    _header_file(model.path / "model-extra.safetensors",
                 {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16)
    backdate(model.path, 30)
    after = estimator.estimate(model.path)
    assert (after.weight_bytes, after.files) == (before.weight_bytes + 16, before.files + 1)
    assert estimator.stats()["invalidations"] == 1


def test_a_folder_written_just_now_is_not_cached(tmp_path):
    model = make_model(tmp_path / "m", age_seconds=0)
    estimator = MemoryEstimator()
    estimator.estimate(model.path)
    estimator.estimate(model.path)
    assert estimator.stats()["misses"] == 2 and estimator.stats()["entries"] == 0


def test_estimates_expire_after_the_ttl(tmp_path):
    model = make_model(tmp_path / "m")
    estimator = MemoryEstimator(ttl_seconds=0.05)
    estimator.estimate(model.path)
    estimator.estimate(model.path)
    time.sleep(0.06)
    estimator.estimate(model.path)
    assert estimator.stats()["hits"] == 1 and estimator.stats()["expirations"] == 1


def test_invalidate_drops_cached_estimates(tmp_path):
    model = make_model(tmp_path / "m")
    estimator = MemoryEstimator()
    estimator.estimate(model.path)
    estimator.invalidate(model.path)
    estimator.estimate(model.path)
    assert estimator.stats()["misses"] == 2


def test_concurrent_first_estimates_compute_once(tmp_path, monkeypatch):
    model = make_model(tmp_path / "m")
    estimator = MemoryEstimator()
    computed, compute = [], estimator._compute

    def slow_compute(folder):
        computed.append(folder)
        time.sleep(0.05)
        return compute(folder)

    monkeypatch.setattr(estimator, "_compute", slow_compute)
    results = []
    threads = [threading.Thread(target=lambda: results.append(estimator.estimate(model.path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(computed) == 1 and len(set(results)) == 1
    assert estimator.stats()["hits"] == 3


def test_a_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidModelFiles, match="cannot read .*gone"):
        MemoryEstimator().estimate(tmp_path / "gone")


# -- system memory and budget ---------------------------------------------------------------


def test_system_memory_is_plausible():
    system = system_memory()
    assert system.total > 0 and 0 <= system.available <= system.total


@pytest.mark.parametrize("configured, expected", [
    (None, int(10 * GIB * 0.8)), ("", int(10 * GIB * 0.8)),
    (0.5, 5 * GIB), (1.0, 10 * GIB), (1, 1), (8 * GIB, 8 * GIB),
    ("12GB", 12 * 10**9), ("8GiB", 8 * GIB), ("8 gib", 8 * GIB), ("8G", 8 * GIB),
    ("512MB", 512 * 10**6), ("1.5GB", 1_500_000_000), ("75%", int(10 * GIB * 0.75)),
    ("0.25", int(10 * GIB * 0.25)), ("1024", 1024), ("100%", 10 * GIB),
])
def test_budget_accepts_fractions_bytes_sizes_and_percentages(configured, expected):
    assert budget_bytes(configured, total=10 * GIB) == expected


@pytest.mark.parametrize("configured, why", [
    (0, "more than 0"), (-5, "more than 0"), (0.0, "fraction"), (1.5, "fraction"),
    (True, "not a size"), ("lots", "not a size"), ("12XB", "unknown unit"), ("150%", "fraction"),
    ("0%", "fraction"), ([1], "not a size"), ("0GB", "more than 0"),
])
def test_an_invalid_budget_says_why(configured, why):
    with pytest.raises(InvalidMemoryBudget, match=why) as excinfo:
        budget_bytes(configured, total=10 * GIB)
    assert isinstance(excinfo.value, ValueError)  # usable in a traitlets validator


def test_process_rss_counts_children_and_is_none_for_a_gone_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    try:
        while psutil.Process(child.pid).memory_info().rss < 1_000_000:
            time.sleep(0.01)  # until the interpreter is up
        own = psutil.Process(os.getpid()).memory_info().rss
        assert process_rss(os.getpid()) >= own + psutil.Process(child.pid).memory_info().rss // 2
    finally:
        child.kill()
        child.wait()
    assert process_rss(child.pid) is None
    assert process_rss(None) is None


def test_rss_sampler_reuses_a_reading_until_it_expires():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    reused, fresh = RssSampler(ttl=3600), RssSampler(ttl=0)
    try:
        first = reused(child.pid)
        assert first is not None and fresh(child.pid) is not None
    finally:
        child.kill()
        child.wait()
    assert reused(child.pid) == first  # the reading from before the process ended
    assert fresh(child.pid) is None  # read again: the process is gone
    assert reused(None) is None


# -- KV bytes per token and what a loaded model is counted for ------------------------------


@pytest.mark.parametrize("options", [
    {"hidden": 64, "layers": 2},  # multi-head attention, float32
    {"hidden": 128, "layers": 3, "kv_heads": 1, "dtype": "float16"},  # grouped-query, half
])
def test_kv_bytes_per_token_are_what_mlx_lm_allocates(tmp_path, options):
    """The estimate from the config against the KV cache mlx-lm really builds for the model."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    model = make_model(tmp_path / "m", **options)
    estimate = MemoryEstimator().estimate(model.path)
    loaded, _ = load(str(model.path))
    cache = make_prompt_cache(loaded)
    loaded(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    mx.eval([c.state for c in cache])
    allocated = sum(c.nbytes for c in cache)  # buffers of 256 positions (mlx-lm's step)
    assert estimate.kv_bytes_per_token == allocated // cache[0].keys.shape[2] > 0


@pytest.mark.parametrize(("config", "element_bytes", "expected"), [
    # Llama 3 8B: 32 layers, 8 KV heads of 128 dimensions, bf16: 128 KiB a token.
    ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
      "hidden_size": 4096}, 2, 2 * 32 * 8 * 128 * 2),
    # An explicit head_dim wins over hidden_size / heads (Gemma, Qwen3).
    ({"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "hidden_size": 64, "head_dim": 128}, 2, 2 * 2 * 2 * 128 * 2),
    # GPT-2's names; no KV heads given: one per attention head.
    ({"n_layer": 12, "n_head": 12, "n_embd": 768}, 4, 2 * 12 * 768 * 4),
    # A vision model's language part is in its text_config.
    ({"vision_config": {}, "text_config": {"num_hidden_layers": 4, "num_attention_heads": 8,
                                           "hidden_size": 512}}, 2, 2 * 4 * 512 * 2),
    ({"model_type": "whisper"}, 2, 0),  # nothing said of attention: nothing reserved
])
def test_kv_bytes_per_token_from_configs_of_many_families(config, element_bytes, expected):
    assert memory.kv_bytes_per_token(config, element_bytes) == expected


def test_the_activation_dtype_is_the_float_dtype_holding_most_weights():
    # A 4-bit model: packed U32 weights, bf16 scales and biases: it computes in bf16.
    assert memory.activation_element_bytes({"BF16": 10, "F32": 2}, {}) == 2
    assert memory.activation_element_bytes({"F32": 10, "F16": 20}, {}) == 2
    assert memory.activation_element_bytes({}, {"torch_dtype": "float32"}) == 4
    assert memory.activation_element_bytes({}, {}) == 2


def test_a_footprint_is_the_sum_of_its_parts():
    footprint = memory.Footprint(model_bytes=10, prompt_cache_bytes=20, kv_reserve_bytes=30,
                                 worker_bytes=40)
    assert footprint.total_bytes == 100
    assert footprint.to_dict() == {"model_bytes": 10, "prompt_cache_bytes": 20,
                                   "kv_reserve_bytes": 30, "worker_bytes": 40,
                                   "total_bytes": 100}
