"""Memory planner: numbers for the published Kimi-Linear-48B-A3B config."""
from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import pytest

from kimi_mlx import planner
from kimi_mlx.planner import (
    Plan,
    PlanError,
    cache_bytes,
    check_fits,
    estimate_prefill_seconds,
    kda_state_bytes,
    machine_memory_bytes,
    max_context,
    mla_bytes_per_token,
    param_count,
    plan,
    prefill_peak_bytes,
    weight_bytes,
)

# config.json of the published Instruct checkpoint (layer lists are 1-indexed)
PUBLISHED = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 27,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 72,
    "vocab_size": 163840,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "mla_use_nope": True,
    "num_experts": 256,
    "num_experts_per_token": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 1024,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "routed_scaling_factor": 2.446,
    "num_expert_group": 1,
    "topk_group": 1,
    "use_grouped_topk": True,
    "num_nextn_predict_layers": 0,
    "model_max_length": 1048576,
    "bos_token_id": 163584,
    "eos_token_id": 163586,
    "pad_token_id": 163839,
    "linear_attn_config": {
        "head_dim": 128,
        "num_heads": 32,
        "short_conv_kernel_size": 4,
        "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
        "kda_layers": [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26],
    },
}
MIB = 1 << 20
M1 = 1 << 20  # one "million" tokens as the model counts them (1,048,576)


def test_layer_split_is_zero_indexed():
    a = planner._config(PUBLISHED)
    assert a.mla_layers == [3, 7, 11, 15, 19, 23, 26]
    assert len(a.kda_layers) == 20 and a.kda_layers[0] == 0


def test_parameter_count_and_weight_bytes():
    n = param_count(PUBLISHED)
    assert 48.0e9 <= n <= 49.5e9
    assert 97e9 <= weight_bytes(PUBLISHED, bits=16) <= 99e9
    q4 = weight_bytes(PUBLISHED, bits=4, group_size=64)
    assert 27e9 <= q4 <= 28e9
    # 4 bits + a 16-bit scale and bias per 64 weights = 0.5625 bytes per weight
    assert q4 == pytest.approx(n * 0.5625, rel=0.01)
    assert weight_bytes(PUBLISHED, bits=4, group_size=32) > q4
    assert weight_bytes(PUBLISHED, bits=4) < weight_bytes(PUBLISHED, bits=8) < weight_bytes(PUBLISHED)
    with pytest.raises(ValueError):
        weight_bytes(PUBLISHED, bits=7)


def test_parameter_count_by_hand():
    # experts dominate: 26 MoE layers x (256 routed + 1 shared) x 3 x 1024 x 2304
    experts = 26 * 257 * 3 * 1024 * 2304
    embed = 2 * 163840 * 2304
    dense = 3 * 9216 * 2304
    b = planner.param_breakdown(PUBLISHED)
    assert b["matrix"] > experts + embed + dense
    assert b["matrix"] - (experts + embed + dense) < 1.1e9  # attention projections
    assert b["fp32"] == 20 * (4096 + 32) + 26 * 256


def test_state_and_cache_numbers():
    state, conv = kda_state_bytes(PUBLISHED)
    assert state == 20 * 32 * 128 * 128 * 4 == 40 * MIB
    assert conv == 20 * 3 * 4096 * 3 * 2
    assert mla_bytes_per_token(PUBLISHED) == 7 * 576 * 2 == 8064  # ~7.9 KiB per token
    assert mla_bytes_per_token(PUBLISHED, mla_bits=8) == 7 * (576 + 9 * 4)
    full = cache_bytes(PUBLISHED, M1)
    assert 8.0e9 <= full - state - conv <= 8.6e9  # ~8 GB at 1M tokens
    assert full == state + conv + 8064 * M1  # 1M is a whole number of pages
    assert cache_bytes(PUBLISHED, 0) == state + conv  # KDA state does not depend on length
    assert cache_bytes(PUBLISHED, M1, batch=2) == 2 * full
    # 8-bit halves the cache (plus scales)
    q8 = cache_bytes(PUBLISHED, M1, mla_bits=8)
    assert 0.5 < (q8 - state - conv) / (full - state - conv) < 0.56
    with pytest.raises(ValueError):
        cache_bytes(PUBLISHED, 10, mla_bits=4)


def test_cache_pages():
    state, conv = kda_state_bytes(PUBLISHED)
    # one segment reserved for the context, never smaller than 4096 rows (16-bit rows: 7 x 1152 B)
    assert cache_bytes(PUBLISHED, 1) - state - conv == 8064 * 4096
    assert cache_bytes(PUBLISHED, 4097) - state - conv == 8064 * 4097
    assert cache_bytes(PUBLISHED, 1, page_tokens=0) - state - conv == 8064
    # 8-bit: every row quantized as it is appended (612 B with the scales and biases)
    q = cache_bytes(PUBLISHED, 4096 + 10, mla_bits=8) - state - conv
    assert q == 7 * (4096 + 10) * 612


def test_prefill_peak_is_modest_and_grows_with_chunk():
    p2k = prefill_peak_bytes(PUBLISHED, 2048)
    p8k = prefill_peak_bytes(PUBLISHED, 8192)
    assert 0.1e9 < p2k < 2e9
    assert p2k < p8k < 5 * p2k
    assert prefill_peak_bytes(PUBLISHED, 2048, all_logits=True) > p2k + 2048 * 163840 * 4
    assert prefill_peak_bytes(PUBLISHED, 0) == 0


def test_plan_fits_and_describe():
    p = plan(PUBLISHED, M1, bits=4, machine_bytes=96 * 10**9)
    assert isinstance(p, Plan) and p.fits
    assert p.total_bytes == (p.weights_bytes + p.kda_state_bytes + p.conv_state_bytes
                             + p.mla_cache_bytes + p.prefill_bytes + p.dequant_bytes
                             + p.overhead_bytes)
    assert p.dequant_bytes == 0
    assert 36e9 < p.total_bytes < 40e9
    assert p.max_context_tokens > M1
    assert not p.exceeds_model_limit
    text = p.describe()
    assert "1,048,576 tokens" in text
    assert "27.66 GB" in text  # weights
    assert "8.46 GB" in text  # MLA cache
    assert "96.00 GB usable: fits" in text
    assert f"{p.max_context_tokens:,} tokens" in text


def test_8bit_cache_counts_one_dequantized_layer():
    p = plan(PUBLISHED, M1, bits=4, mla_bits=8, machine_bytes=10**11)
    assert p.dequant_bytes == M1 * 576 * 2  # one layer of bf16 rows
    assert "MLA pages dequantized while read" in p.describe()
    assert p.total_bytes < plan(PUBLISHED, M1, bits=4, machine_bytes=10**11).total_bytes


def test_max_context_is_exact_boundary():
    budget = 36 * 10**9
    n = max_context(PUBLISHED, budget, bits=4)
    assert plan(PUBLISHED, n, bits=4, machine_bytes=budget).fits
    assert not plan(PUBLISHED, n + 1, bits=4, machine_bytes=budget).fits
    n8 = max_context(PUBLISHED, budget, bits=4, mla_bits=8)
    assert n8 > 1.3 * n
    assert plan(PUBLISHED, n8, bits=4, mla_bits=8, machine_bytes=budget).fits
    assert not plan(PUBLISHED, n8 + 1, bits=4, mla_bits=8, machine_bytes=budget).fits
    assert max_context(PUBLISHED, 10 * 10**9, bits=4) == 0  # weights alone don't fit
    assert plan(PUBLISHED, 10, bits=4, machine_bytes=budget).max_context_tokens == n


@pytest.mark.parametrize("mla_bits", [16, 8])
def test_breakdown_shows_every_part_of_the_total(mla_bits):
    """'about 1.21 GB (weights 4.9 MB, cache 0.9 MB, prefill 0.13 GB)' hid the 1 GiB runtime: the
    line shows every term, and the shown terms add up to the shown total."""
    import re

    from helpers import MODELS

    cfg = json.loads((MODELS / "tiny_grouped" / "config.json").read_text())
    p = plan(cfg, 300_000, mla_bits=mla_bits, machine_bytes=64 * 10**9)
    assert sum(v for _, v in p.parts()) == p.total_bytes
    line = p.breakdown()
    assert f"runtime {planner.format_bytes(planner.RUNTIME_OVERHEAD_BYTES)}" in line
    assert ("dequantized MLA pages" in line) == (mla_bits == 8)
    shown = sum(float(n) * (1e6 if u == "MB" else 1e9) for n, u in re.findall(r"([\d.]+) (MB|GB)", line))
    assert abs(shown - p.total_bytes) <= 0.05e6 * len(p.parts()) + 0.005e9  # display rounding only
    assert line.count(" + ") == len(p.parts()) - 1


def test_check_fits_refusal_gives_numbers():
    assert check_fits(PUBLISHED, 100_000, bits=4, machine_bytes=48 * 10**9).fits
    with pytest.raises(PlanError) as ei:
        check_fits(PUBLISHED, 2 * M1, bits=4, machine_bytes=36 * 10**9)
    msg = str(ei.value)
    p = ei.value.plan
    assert isinstance(p, Plan) and not p.fits
    assert "2,097,152 tokens" in msg
    assert "36.00 GB" in msg  # the budget
    assert planner.format_bytes(p.total_bytes) in msg
    assert "27.66 GB" in msg  # the weights
    assert f"At most {p.max_context_tokens:,} tokens fit" in msg
    assert "8-bit MLA cache" in msg
    assert p.exceeds_model_limit and "trained length" in p.describe()
    assert isinstance(ei.value, ValueError)


def test_bits_default_from_config_quantization():
    cfg = copy.deepcopy(PUBLISHED)
    assert plan(cfg, 1, machine_bytes=10**12).bits == 16
    cfg["quantization"] = {"bits": 4, "group_size": 64}
    p = plan(cfg, 1, machine_bytes=10**12)
    assert p.bits == 4 and p.weights_bytes == weight_bytes(PUBLISHED, 4, 64)
    assert plan(cfg, 1, machine_bytes=10**12, weights_bytes=123).weights_bytes == 123


def test_takes_a_model_config_or_its_dict():
    from kimi_mlx.config import ModelConfig

    mc = ModelConfig.from_dict(copy.deepcopy(PUBLISHED))
    assert planner._config(mc) is mc
    assert param_count(mc) == param_count(PUBLISHED)
    assert cache_bytes(mc, 12345) == cache_bytes(PUBLISHED, 12345)
    with pytest.raises(PlanError, match="missing field"):
        param_count({"num_hidden_layers": 2})
    with pytest.raises(TypeError, match="ModelConfig"):
        param_count(SimpleNamespace(**PUBLISHED))


def test_machine_memory_and_prefill_time(monkeypatch):
    total = machine_memory_bytes(usable=False)
    usable = machine_memory_bytes()
    if total is not None:
        assert 0 < usable <= total
    # Linux path with a fake /proc/meminfo and no cgroup limit
    monkeypatch.setattr(planner.sys, "platform", "linux")
    monkeypatch.setattr(planner, "_meminfo", lambda: {"MemTotal": 64 * 10**9, "MemAvailable": 40 * 10**9})
    monkeypatch.setattr(planner, "_cgroup_limit", lambda: None)
    assert machine_memory_bytes() == 36 * 10**9
    monkeypatch.setattr(planner, "_cgroup_limit", lambda: 10 * 10**9)
    assert machine_memory_bytes() == 9 * 10**9
    # macOS path: 75% of RAM unless the wired limit was raised
    monkeypatch.setattr(planner.sys, "platform", "darwin")
    vals = {"hw.memsize": 128 * 2**30, "iogpu.wired_limit_mb": 0}
    monkeypatch.setattr(planner, "_sysctl_int", lambda name: vals[name])
    assert machine_memory_bytes() == 96 * 2**30
    assert machine_memory_bytes(usable=False) == 128 * 2**30
    vals["iogpu.wired_limit_mb"] = 120 * 1024
    assert machine_memory_bytes() == 120 * 2**30
    assert estimate_prefill_seconds(1_000_000, 2000) == 500.0
    with pytest.raises(ValueError):
        estimate_prefill_seconds(10, 0)
    p = plan(PUBLISHED, 100_000, bits=4, machine_bytes=10**11, tokens_per_second=2000)
    assert p.prefill_seconds == 50.0 and "prefill time: 50 s" in p.describe()
    assert planner.format_duration(5400) == "1.5 h"


def test_prefill_speed_is_remembered(tmp_path, monkeypatch):
    from kimi_mlx import planner

    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path))
    monkeypatch.delenv("KIMI_MLX_HOME", raising=False)
    assert planner.known_prefill_speed("m:cpu") is None
    planner.record_prefill_speed("m:cpu", 100, 1.0)  # too short to say anything
    assert planner.known_prefill_speed("m:cpu") is None
    planner.record_prefill_speed("m:cpu", 4096, 2.0)
    assert planner.known_prefill_speed("m:cpu") == 2048.0
    assert planner.known_prefill_speed("other:cpu") is None
    (tmp_path / "prefill_speed.json").write_text("{not json")  # damaged: ignored, then rewritten
    assert planner.known_prefill_speed("m:cpu") is None
    planner.record_prefill_speed("m:cpu", 2048, 4.0)
    assert planner.known_prefill_speed("m:cpu") == 512.0


def test_prefill_speed_moves_with_kimi_mlx_home(tmp_path, monkeypatch):
    """KIMI_MLX_HOME (the chat app's data dir) keeps the remembered speeds too; written atomically."""
    from kimi_mlx import planner

    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KIMI_MLX_HOME", str(tmp_path / "home"))
    planner.record_prefill_speed("m:cpu", 4096, 2.0)
    assert json.loads((tmp_path / "home" / "prefill_speed.json").read_text())["m:cpu"]["tokens"] == 4096
    assert not (tmp_path / "cache").exists()
    assert os.listdir(tmp_path / "home") == ["prefill_speed.json"]  # no temp file left behind

    def torn(*a, **k):  # a failed write leaves the old file as it was, and no temp file
        raise OSError("disk full")

    monkeypatch.setattr(planner.os, "replace", torn)
    planner.record_prefill_speed("m:cpu", 8192, 2.0)
    assert planner.known_prefill_speed("m:cpu") == 2048.0
    assert os.listdir(tmp_path / "home") == ["prefill_speed.json"]


def test_session_prefill_records_speed_for_the_next_estimate(tmp_path, monkeypatch):
    from helpers import MODELS
    from kimi_mlx import load_model, planner, session

    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path))
    model = load_model(MODELS / "tiny_grouped")
    session.prefill(model, list(range(1, 1100)), step=512)
    tps = planner.known_prefill_speed(session.speed_key(model))
    assert tps is not None and tps > 0
    p = planner.plan(model.config, 10_000, machine_bytes=1 << 34, tokens_per_second=tps)
    assert abs(p.prefill_seconds - 10_000 / tps) < 1e-6
