"""A decode token's MoE with the routed experts and the shared expert stacked (switch.StackedExperts,
moe.route_stacked): the values of the unstacked layers, the layers' arrays views of the stacked
ones (nothing stored twice, prefill unchanged), the routing kernel's stacked outputs under the Metal
and CUDA emulators, and the layers it leaves alone."""
from __future__ import annotations

import gc
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import metal_kernels
from helpers import MODELS
from kimi_mlx.bench.step import _graph_ops
from kimi_mlx.config import ModelConfig
from kimi_mlx.model import moe as M
from kimi_mlx.model.moe import KimiMoE
from metal_kernels import moe as K
from metal_kernels.emulate import cxx
from test_kernel_dispatch import _EmulatedKernel


def _moe(hidden=64, inter=32, experts=8, k=2, quantized=False, n_group=1, topk_group=1, seed=0):
    raw = json.loads((MODELS / "tiny_quant" / "config.json").read_text())
    raw.update(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts, num_experts_per_token=k,
               num_expert_group=n_group, topk_group=topk_group)
    moe = KimiMoE(ModelConfig.from_dict(raw))
    mx.random.seed(seed)
    moe.update(tree_unflatten([(n, 0.2 * mx.random.normal(a.shape)) for n, a in tree_flatten(moe.parameters())]))
    moe.e_score_correction_bias = mx.random.uniform(0, 0.3, (experts,))
    if quantized:
        nn.quantize(moe, group_size=32, bits=8, class_predicate=lambda p, m: p != "gate" and hasattr(m, "to_quantized"))
    mx.eval(moe.parameters())
    return moe


def _unstacked(moe, x):
    """The general form (route, SwitchGLU, the shared MLP), whatever the layer holds."""
    c = moe.cfg
    logits = x.astype(mx.float32) @ moe.gate.weight.astype(mx.float32).T if "scales" not in moe.gate \
        else moe.gate(x).astype(mx.float32)
    inds, w = M.route_reference(logits, moe.e_score_correction_bias, c.num_experts_per_token, c.num_expert_group,
                                c.topk_group, c.moe_renormalize, c.routed_scaling_factor)
    y = (moe.switch_mlp(x, inds) * w[..., None].astype(x.dtype)).sum(axis=-2)
    return y + moe.shared_experts(x)


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("B", [1, 2])
def test_stacked_token_matches_the_unstacked_layers(quantized, B):
    moe = _moe(quantized=quantized)
    x = mx.random.normal((B, 1, 64))
    want = _unstacked(moe, x)
    prefill = moe(mx.random.normal((B, 5, 64)))  # prefill never stacks
    assert "_stacked_experts" not in moe.__dict__
    got = moe(x)
    stacked = moe.__dict__["_stacked_experts"][1]
    assert stacked is not None
    assert mx.abs(got - want).max().item() < 1e-5
    # the layers' arrays are views of the stacked ones: the same values, the same shapes as loaded
    g = moe.switch_mlp.gate_proj
    E = g.weight.shape[0]
    assert mx.array_equal(stacked.gate_up.weight[E + 1:2 * E + 1], moe.switch_mlp.up_proj.weight).item()
    assert mx.array_equal(stacked.down.weight[E], moe.shared_experts.down_proj.weight).item()
    assert mx.abs(_unstacked(moe, x) - want).max().item() < 1e-6
    xp = mx.random.normal((B, 5, 64))
    assert mx.abs(moe(xp) - _unstacked(moe, xp)).max().item() < 1e-5  # prefill on the views
    assert prefill.shape == (B, 5, 64)
    # one token: two gathered matmuls, no plain matmul of the shared expert
    ops = _graph_ops([moe(x)])
    assert ops["GatherQMM" if quantized else "GatherMM"] == 2
    assert ops["Matmul"] + ops.get("QuantizedMatmul", 0) == 2  # the router and the weighted sum


def test_stacking_stores_nothing_twice():
    """After stacking, the unstacked arrays are gone: active memory as before, not doubled, also
    where prefill and an unstacked token made views of them first (a layer's derived arrays)."""
    moe = _moe(hidden=256, inter=512, experts=16)
    moe.shared_experts(mx.random.normal((1, 1, 256)))  # the shared MLP's own joined gate|up
    x = mx.random.normal((1, 1, 256))
    mx.eval(moe(mx.random.normal((1, 4, 256))), x)
    gc.collect()
    before = mx.get_active_memory()
    experts = sum(a.nbytes for n, a in tree_flatten(moe.parameters()) if "switch_mlp" in n or "shared" in n)
    assert experts > 20 * 2**20
    mx.eval(moe(x))
    gc.collect()
    after = mx.get_active_memory()
    assert after - before < 0.1 * experts, (before, after, experts)


def test_new_weights_are_stacked_again():
    moe = _moe()
    x = mx.random.normal((1, 1, 64))
    moe(x)
    first = moe.__dict__["_stacked_experts"][1]
    moe.load_weights([("switch_mlp.up_proj.weight", -moe.switch_mlp.up_proj.weight)], strict=False)
    got = moe(x)
    assert moe.__dict__["_stacked_experts"][1] is not first
    assert mx.abs(got - _unstacked(moe, x)).max().item() < 1e-5
    assert moe(x) is not None and moe.__dict__["_stacked_experts"][1] is not first  # no restack per call
    second = moe.__dict__["_stacked_experts"][1]
    moe(x)
    assert moe.__dict__["_stacked_experts"][1] is second


def test_experts_that_cannot_be_stacked_run_unstacked():
    # a shared expert twice as wide as a routed one
    moe = _moe()
    moe.shared_experts = type(moe.shared_experts)(64, 64)
    x = mx.random.normal((2, 1, 64))
    assert mx.abs(moe(x) - _unstacked(moe, x)).max().item() < 1e-5
    assert moe.__dict__["_stacked_experts"][1] is None
    # routed experts quantized, the shared one not
    moe = _moe()
    nn.quantize(moe.switch_mlp, group_size=32, bits=8)
    assert mx.abs(moe(x) - _unstacked(moe, x)).max().item() < 1e-5
    assert moe.__dict__["_stacked_experts"][1] is None


def test_grouped_routing_stacks_through_the_mlx_ops():
    moe = _moe(experts=16, k=3, n_group=4, topk_group=2)
    for B in (1, 2):
        x = mx.random.normal((B, 1, 64))
        assert mx.abs(moe(x) - _unstacked(moe, x)).max().item() < 1e-5
    assert moe.__dict__["_stacked_experts"][1] is not None


@pytest.fixture(params=["metal", "cuda"])
def emu(request, monkeypatch):
    if cxx() is None:
        pytest.skip("no C++ compiler")
    be, log = request.param, []
    for var in ("KIMI_MLX_MOE_ROUTE", "KIMI_MLX_KDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: be == "metal")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: be == "cuda")
    monkeypatch.setattr(metal_kernels, "_kernel", lambda b, kind, *a, **kw: _EmulatedKernel(kind, log, b))
    monkeypatch.setattr(M, "_on_gpu", lambda: True)
    return log


# the emulator fills outputs with NaN first, which numpy casts to uint32 with a warning
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("E,k,N,dtype", [(256, 8, 1, mx.bfloat16), (256, 8, 3, mx.float32), (64, 31, 2, mx.float32)])
def test_route_kernel_stacked_outputs(emu, E, k, N, dtype):
    """The kernel's shared pick, doubled indices and weights' type against route_stacked's MLX ops."""
    rng = np.random.default_rng(E + k + N)
    logits = mx.array(rng.standard_normal((N, E)).astype(np.float32) * 2)
    bias = mx.array(rng.uniform(0, 0.4, E).astype(np.float32))
    gu, inds, w = M.route_stacked(logits, bias, k, 1, 1, True, 2.446, dtype)
    assert [(kind, t["SH"], t["DUP"]) for kind, t in emu] == [("moe_route", 1, True)]
    emu.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "_on_gpu", lambda: False)
        rgu, rinds, rw = M.route_stacked(logits, bias, k, 1, 1, True, 2.446, dtype)
    assert emu == []
    assert gu.shape == rgu.shape == (N, 2 * (k + 1)) and inds.shape == (N, k + 1) and w.dtype == rw.dtype == dtype
    order, rorder = np.argsort(np.array(inds), -1), np.argsort(np.array(rinds), -1)
    take = lambda a, o: np.take_along_axis(np.array(a.astype(mx.float32)), o, -1)  # noqa: E731
    np.testing.assert_array_equal(take(inds, order), take(rinds, rorder))
    np.testing.assert_allclose(take(w, order), take(rw, rorder), rtol=1e-6 if dtype == mx.float32 else 0)
    np.testing.assert_array_equal(np.array(inds)[:, -1], E)  # the shared expert last, weight 1
    np.testing.assert_array_equal(np.array(w.astype(mx.float32))[:, -1], 1.0)
    np.testing.assert_array_equal(np.array(gu), np.concatenate([np.array(inds), np.array(inds) + E + 1], -1))
    assert K.moe_route(logits, bias, 32, True, 1.0, shared=True) is None  # 33 picks: no kernel


def test_stacking_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("KIMI_MLX_MOE_STACK", "off")
    moe = _moe()
    x = mx.random.normal((1, 1, 64))
    assert mx.abs(moe(x) - _unstacked(moe, x)).max().item() < 1e-5
    assert "_stacked_experts" not in moe.__dict__
