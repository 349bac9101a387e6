import json
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
