import json
import re
import shutil

import mlx.core as mx
import pytest

from kimi_mlx import load_model
from kimi_mlx.weights import WeightsError, find_shards, load_raw
from helpers import MODELS


@pytest.fixture
def grouped(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(MODELS / "tiny_grouped", d)
    return d


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "s"
    shutil.copytree(MODELS / "tiny_sharded", d)
    return d


def _rewrite(path, fn):
    t = mx.load(str(path))
    fn(t)
    mx.save_safetensors(str(path), t)


def test_both_dense_mlp_namings_load():
    # tiny_grouped stores the dense MLP as mlp.*_proj (published), tiny_sharded as block_sparse_moe.*_proj
    raw, _ = load_raw(MODELS / "tiny_grouped")
    assert "model.layers.0.mlp.gate_proj.weight" in raw
    raw, _ = load_raw(MODELS / "tiny_sharded")
    assert "model.layers.0.block_sparse_moe.gate_proj.weight" in raw
    for name in ("tiny_grouped", "tiny_sharded"):
        load_model(MODELS / name)


def test_shards_without_index(sharded):
    (sharded / "model.safetensors.index.json").unlink()
    assert len(find_shards(sharded)) == 2
    load_model(sharded)


def test_missing_tensor_named(grouped):
    _rewrite(grouped / "model.safetensors", lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(WeightsError, match="missing tensor 'model.layers.2.self_attn.kv_b_proj.weight'"):
        load_model(grouped)


def test_missing_expert_named(grouped):
    _rewrite(grouped / "model.safetensors", lambda t: t.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(WeightsError, match="experts.5.w3"):
        load_model(grouped)


def test_unexpected_tensor_named_with_file(grouped):
    _rewrite(grouped / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.bogus": mx.zeros((2,))}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: unexpected tensor 'model.layers.0.self_attn.bogus'"):
        load_model(grouped)


def test_wrong_shape_named(sharded):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(sharded / idx[name], lambda t: t.update({name: mx.zeros((3, 3))}))
    with pytest.raises(WeightsError, match=rf"{idx[name]}: tensor '{name}' has shape \(3, 3\)"):
        load_model(sharded)


def test_truncated_shard(sharded):
    p = sharded / "model-00002-of-00002.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors: truncated"):
        load_model(sharded)


def test_corrupt_header(grouped):
    p = grouped / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[10:20] = b"\xff" * 10
    p.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="model.safetensors: corrupt"):
        load_model(grouped)


def test_index_lists_missing_shard(sharded):
    (sharded / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing: model-00001-of-00002.safetensors"):
        load_model(sharded)


def test_not_a_model_dir(tmp_path):
    from kimi_mlx.config import ConfigError

    with pytest.raises(ConfigError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(WeightsError, match="not a directory"):
        load_model(tmp_path / "missing")


def _edit_header(path, name, dtype):
    """Change one tensor's dtype in the header, in place (same header length: the data stays put)."""
    import struct

    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header[name]["dtype"] = dtype
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= n
    data[8:8 + n] = blob + b" " * (n - len(blob))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(grouped, value):
    def poison(t):
        w = t["model.norm.weight"]
        t["model.norm.weight"] = mx.concatenate([w[:3], mx.array([value], dtype=w.dtype), w[4:]])
    _rewrite(grouped / "model.safetensors", poison)
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.norm\.weight' holds NaN or infinite"):
        load_model(grouped)


def test_non_finite_bf16_and_f16_found(grouped):
    def poison(t):
        t["model.layers.0.input_layernorm.weight"] = mx.array([1.0, float("nan")]).astype(mx.bfloat16)
        t["model.layers.1.input_layernorm.weight"] = mx.array([float("-inf"), 1.0]).astype(mx.float16)
        t["model.layers.2.input_layernorm.weight"] = mx.array([65504.0, -3.0e38]).astype(mx.float32)
    _rewrite(grouped / "model.safetensors", poison)
    from kimi_mlx.weights import scan_file

    assert scan_file(grouped / "model.safetensors")["nonfinite"] == [
        "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]


def test_scan_is_remembered_per_file(grouped, monkeypatch):
    from kimi_mlx import weights as W

    p = grouped / "model.safetensors"
    first = W.scan_file(p)
    W._scans.clear()  # a new process: only the user cache remembers
    monkeypatch.setattr(W, "_scan_bytes", lambda *a: pytest.fail("scanned again"))
    assert W.scan_file(p) == first
    _rewrite(p, lambda t: t.update({"model.norm.weight": t["model.norm.weight"] * 2}))  # new size/mtime
    monkeypatch.undo()
    assert W.scan_file(p)["sha256"] != first["sha256"]


def test_identity_covers_every_weight_byte(grouped, tmp_path):
    from kimi_mlx.config import ModelConfig
    from kimi_mlx.weights import weights_identity

    cfg = ModelConfig.from_file(grouped)
    before = weights_identity(grouped, cfg)
    same = tmp_path / "same"
    shutil.copytree(grouped, same)
    assert weights_identity(same, cfg) == before  # the bytes, not the path
    _rewrite(grouped / "model.safetensors", lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"] * 1.5}))
    assert weights_identity(grouped, cfg) != before
    q = dict(cfg.raw, quantization={"group_size": 64, "bits": 4})
    assert weights_identity(same, ModelConfig.from_dict(q)) != before


def test_header_dtype_that_does_not_fit_is_refused(grouped):
    _edit_header(grouped / "model.safetensors", "model.norm.weight", "I32")
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is stored as int32; "
                                           r"the config has no quantization block"):
        load_model(grouped)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from kimi_mlx.convert import convert

    dst = tmp_path_factory.mktemp("q") / "q4"
    convert(MODELS / "tiny_quant", dst, quantize=True, q_bits=4, q_group_size=32)
    return dst


@pytest.mark.parametrize("suffix,dtype", [("scales", "I32"), ("weight", "I32"), ("biases", "U32")])
def test_quantized_header_dtypes_checked(quantized, tmp_path, suffix, dtype):
    from kimi_mlx.weights import read_safetensors_header

    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    load_model(d)  # as converted: fine
    shard = next(iter(sorted(d.glob("*.safetensors"))))
    name = next(k for k in sorted(read_safetensors_header(shard)) if k.endswith("q_proj." + suffix))
    _edit_header(shard, name, dtype)
    with pytest.raises(WeightsError, match=rf"{shard.name}: tensor '{re.escape(name)}' is stored as"):
        load_model(d)


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_entry_outside_the_model_dir_is_refused(sharded, entry):
    idx = sharded / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    k = next(iter(data["weight_map"]))
    data["weight_map"][k] = entry
    idx.write_text(json.dumps(data))
    shutil.copy(sharded / "model-00001-of-00002.safetensors", sharded.parent / "outside.safetensors")
    with pytest.raises(WeightsError, match=r"index\.json: shard .* is not a file name inside the model directory"):
        load_model(sharded)


def test_symlinked_shard_outside_is_refused(sharded, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(WeightsError, match=r"shard 'model-00002-of-00002\.safetensors' resolves to .*elsewhere"
                                           r"\.safetensors, outside the model directory"):
        load_model(sharded)
    (sharded / "model.safetensors.index.json").unlink()  # found by glob: the same rule
    with pytest.raises(WeightsError, match="outside the model directory"):
        load_model(sharded)


def test_hugging_face_cache_layout_loads(tmp_path):
    # snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub stores a download
    repo = tmp_path / "models--o--m"
    snap, blobs = repo / "snapshots" / "abc", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((MODELS / "tiny_sharded").iterdir())):
        shutil.copy(f, blobs / f"h{i}")
        (snap / f.name).symlink_to(f"../../blobs/h{i}")
    load_model(snap)


def test_quantized_dtype_must_match_the_config_mode(quantized, tmp_path):
    # the config says this module is mxfp4 (uint8 scales) but the file holds affine float scales
    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    cfg = json.loads((d / "config.json").read_text())
    path = "model.layers.0.self_attn.q_proj"
    cfg["quantization"][path] = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    (d / "config.json").write_text(json.dumps(cfg))
    _rewrite(next(d.glob("*.safetensors")), lambda t: t.pop(f"{path}.biases"))  # mxfp4 has none
    with pytest.raises(WeightsError, match=rf"tensor '{path}.scales' is stored as float\d+, expected uint8"):
        load_model(d)
