"""The MoE's decode-step forms (constant lhs indices for the gathered matmuls, the weighted sum
over the experts as one matmul) give what the general forms give, with fewer kernels."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from helpers import MODELS
from kimi_mlx import load_model
from kimi_mlx.bench.step import _graph_ops
from kimi_mlx.model.moe import KimiMoE
from kimi_mlx.model.switch import SwitchGLU


def _per_token(glu, x, inds):
    """Each token's k experts one by one, with plain matmuls (no gathered matmul at all)."""
    B, T, k = inds.shape
    rows = []
    for b in range(B):
        for t in range(T):
            ys = []
            for j in range(k):
                e = inds[b, t, j].item()
                w = lambda p: p["weight"][e]  # noqa: E731
                h = nn.silu(x[b, t] @ w(glu.gate_proj).T) * (x[b, t] @ w(glu.up_proj).T)
                ys.append(h @ w(glu.down_proj).T)
            rows.append(mx.stack(ys))
    return mx.stack(rows).reshape(B, T, k, x.shape[-1])


@pytest.mark.parametrize("B,T", [(1, 1), (2, 1), (1, 3), (2, 5)])
@pytest.mark.parametrize("quantized", [False, True])
def test_unsorted_gather_matches_per_token_experts(B, T, quantized):
    mx.random.seed(0)
    glu = SwitchGLU(64, 32, 16)
    if quantized:
        nn.quantize(glu, group_size=32, bits=8)
    x = mx.random.normal((B, T, 64))
    inds = mx.random.randint(0, 16, (B, T, 4)).astype(mx.uint32)
    assert inds.size < 64  # the unsorted path, the one with constant lhs indices
    got = glu(x, inds)
    if quantized:  # the reference multiplies the dequantized weights
        ref = SwitchGLU(64, 32, 16)
        for name in ("gate_proj", "up_proj", "down_proj"):
            p = glu[name]
            ref[name].weight = mx.dequantize(p.weight, p.scales, p.biases, group_size=32, bits=8)
        want = _per_token(ref, x, inds)
    else:
        want = _per_token(glu, x, inds)
    assert mx.abs(got - want).max().item() < 1e-4
    assert "Arange" not in _graph_ops([got])


def test_single_token_weighted_sum_matches_the_general_form():
    model = load_model(MODELS / "tiny_grouped", cpu_fast_path=False)
    moe = next(layer.mlp for layer in model.layers if isinstance(layer.mlp, KimiMoE))
    mx.random.seed(1)
    x = mx.random.normal((2, 3, model.config.hidden_size))
    several = moe(x)  # the product-and-sum form
    for t in range(3):
        one = moe(x[:, t:t + 1])  # the matmul form
        assert mx.abs(one - several[:, t:t + 1]).max().item() < 1e-5
    one, several = _graph_ops([moe(x[:, :1])]), _graph_ops([moe(x[:, :2])])
    assert "Arange" not in one and one["Sum"] == several["Sum"] - 1  # the weighted sum is a matmul



def test_router_logits_from_an_fp32_copy_made_once():
    """A bf16 router weight is converted to fp32 once, not every call (a kernel and 3.5 MB of
    traffic a MoE layer a token at the real widths): the same output as an fp32 router of the same
    values, and a replaced weight (load_weights) gets a new copy."""
    model = load_model(MODELS / "tiny_grouped", cpu_fast_path=False)
    i, moe = next((i, layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, KimiMoE))
    moe.gate.weight = moe.gate.weight.astype(mx.bfloat16)
    mx.random.seed(2)
    x = mx.random.normal((2, 3, model.config.hidden_size))
    got = moe(x)
    first = moe.__dict__["_gate_fp32"][1][0]  # the copy's transposed view
    assert first.dtype == mx.float32 and mx.array_equal(first, moe.gate.weight.astype(mx.float32).T)
    moe(x[:, :1])
    assert moe.__dict__["_gate_fp32"][1][0] is first  # made once
    bf16 = moe.gate.weight
    moe.gate.weight = bf16.astype(mx.float32)  # an fp32 router of the same values: no copy needed
    assert mx.array_equal(moe(x), got)
    moe.gate.weight = bf16
    model.load_weights([(f"model.layers.{i}.mlp.gate.weight", -bf16)], strict=False)
    moe(x)
    assert mx.array_equal(moe.__dict__["_gate_fp32"][1][0], -first)
