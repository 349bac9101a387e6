"""Kernel dispatch (selected by `pytest -k kernel`): which path runs where, and the whole model
running through the Metal kernels' own launch code with the Metal text executed on the CPU
(emulated threadgroups), against the transformers oracle's logits."""
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

import metal_kernels
from helpers import MODELS, golden, max_abs
from kimi_mlx import load_model
from kimi_mlx.ops import kda as kda_ops
from metal_kernels.dialect import DIALECTS
from metal_kernels.emulate import cxx, run_cuda, run_metal
from metal_kernels.sources import io_names

_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16", mx.int32: "int32",
          mx.uint32: "uint32"}


class _EmulatedKernel:
    """Stands in for mx.fast.metal_kernel (be "metal") or mx.fast.cuda_kernel (be "cuda", with
    its shared_memory bytes): same call, runs that rendering of the kernel on the CPU."""

    def __init__(self, kind, log, be="metal", shared_memory=0):
        self.kind, self.log, self.be, self.shared_memory = kind, log, be, shared_memory

    def __call__(self, *, inputs, template, grid, threadgroup, output_shapes, output_dtypes,
                 init_value=None):
        ins, outs = io_names(self.kind, DIALECTS[self.be])
        tmpl = [(n, _NAMES[v] if isinstance(v, mx.Dtype) else v) for n, v in template]
        self.log.append((self.kind, dict(tmpl)))
        args = (
            self.kind, tmpl,
            {n: np.array(a if a.dtype in (mx.int32, mx.uint32) else a.astype(mx.float32)) for n, a in zip(ins, inputs)},
            {n: _NAMES[a.dtype] for n, a in zip(ins, inputs)},
            dict(zip(outs, output_shapes)),
            {n: _NAMES[d] for n, d in zip(outs, output_dtypes)},
            (grid[0] // threadgroup[0], grid[1], grid[2]), threadgroup[0])
        res = run_cuda(*args, self.shared_memory) if self.be == "cuda" else run_metal(*args)
        return [mx.array(res[n]).astype(d) for n, d in zip(outs, output_dtypes)]


@pytest.fixture
def emulated_metal(monkeypatch):
    """metal_kernels believes it is on an Apple GPU; its kernels run through the emulator."""
    if cxx() is None:
        pytest.skip("no C++ compiler")
    log = []
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "_kernel", lambda be, kind, *a: _EmulatedKernel(kind, log))
    # the first-use check of the MLA kernels on Metal has its own tests (test_mla_kernels.py)
    monkeypatch.setattr("kimi_mlx.ops.attention._kernels_trusted", lambda kind, key: True)
    return log


def test_kernel_info_arrays_leave_the_scalar_pool():
    """Kernel info arrays hold their values first and take more than the 8 bytes MLX-CUDA keeps
    host-resident in its scalar pool (metal_kernels.INFO_MIN)."""
    f, i = metal_kernels.info_floats(0.25), metal_kernels.info_ints(7, -3, 5, 2, 9)
    assert f.dtype == mx.float32 and f.nbytes > 8 and f.tolist()[:1] == [0.25]
    assert i.dtype == mx.int32 and i.tolist() == [7, -3, 5, 2, 9]
    assert metal_kernels.info_ints(1, 2).tolist() == [1, 2, 0, 0]


def test_step_info_serves_successive_decode_steps_from_one_table():
    """A decode step's info values (cache row, then per segment n, start, q_offset, heads, keys per
    split) come back exact whatever the sequence, and a run of steps makes about one table per
    StepInfo.RING steps, not one array a step; two interleaved streams keep a table each."""
    info = metal_kernels.StepInfo()
    made = []
    new_table = info._new_table
    info._new_table = lambda vals: made.append(vals) or new_table(vals)

    def step(r, old_n, q, kps):  # a closed segment of old_n rows and the tail, at cache row r
        return (r, old_n, 0, q, 32, kps, r + 1, old_n, q, 32, 64)

    asked = [step(r, 4096, 4096 + r, 512 if r < 300 else 544) for r in range(600)]
    asked += [step(r, 8192, 8192 + r, 544) for r in range(5)]  # the tail closed: a new segment layout
    for vals in asked:
        a = info(*vals)
        assert a.dtype == mx.int32 and a.tolist() == list(vals)
        assert info(*vals) is a  # the step's other MLA layers share the array
    # first call, step learned, ring exhausted at 256 and 512 rows, keys per split changed at 300, new layout
    assert len(made) <= 8, made
    made.clear()
    for r in range(600, 700):  # two streams stepping in turn
        for old_n in (4096, 70000):
            vals = step(r, old_n, old_n + r, 544)
            assert info(*vals).tolist() == list(vals)
    assert len(made) <= 4, made
    assert info(1, 2).tolist() == [1, 2, 0, 0]  # padded as info_ints (the scalar pool)


def test_kernel_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    assert mx.default_device() == mx.cpu or not mx.metal.is_available()
    assert metal_kernels.backend() is None and kda_ops.kernel_backend() is None
    x = mx.zeros((1, 8, 2, 32))
    assert metal_kernels.kda_prefill_fused(x, x, x, x, mx.zeros(64), mx.zeros(2), mx.zeros((1, 8, 2))) is None


def test_kernel_backend_env_forces_reference(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    assert kda_ops.kernel_backend() == "metal"
    monkeypatch.setenv("KIMI_MLX_KDA", "reference")
    assert metal_kernels.backend() is None and kda_ops.kernel_backend() is None


def test_kernel_unsupported_shape_falls_back(emulated_metal):
    # K = 16 is not a kernel shape: the MLX-ops path runs, the emulator is never called
    rng = np.random.default_rng(0)
    B, T, H, K = 2, 9, 2, 16
    raw = [mx.array(rng.standard_normal(s).astype(np.float32))
           for s in [(B, T, H, K)] * 3 + [(B, T, H, K), (B, T, H), (B, T, H, K)]]
    q, k, v, f, b, gate = raw
    o, S = kda_ops.kda_gated(q, k, v, f, b, mx.zeros(H * K), mx.zeros(H), mx.ones(K), gate, 1e-5)
    assert emulated_metal == [] and o.shape == (B, T, H, K) and S.shape == (B, H, K, K)


def tiny_quant_through_kernels(log, kernels_off):
    """tiny_quant through the kernels' launch code: 65 tokens of prefill against the transformers
    oracle's logits, then two decode steps against the same continuation after kernels_off() (the
    MLX-ops path: identical up to fp32 rounding). Returns the launches logged in prefill and in decode."""
    model = load_model(MODELS / "tiny_quant")
    g = golden("tiny_quant")
    ids = mx.array(g["ids"][:1, :67])
    cache = model.make_cache()
    logits = model(ids[:, :65], cache=cache)
    assert max_abs(logits[0], g["logits_65"]) < 1e-4
    prefill = list(log)
    log.clear()
    steps = [model(ids[:, t:t + 1], cache=cache)[0, -1] for t in (65, 66)]
    decode = list(log)
    kernels_off()
    ref = model(ids[:, :67])[0]
    for i, t in enumerate((65, 66)):
        assert max_abs(steps[i], ref[t]) < 1e-4
    return prefill, decode


@pytest.mark.parametrize("split", ["0", "1"])
def test_kernel_model_matches_oracle_through_emulated_metal(emulated_metal, monkeypatch, split):
    """tiny_quant (K = V = 64): prefill 65 tokens through the chunk-scan kernel (two chunks, the
    second a 1-token tail), then decode through the fused step kernel (gated RMSNorm fused).
    split=1: the v-slice threadgroups of a head share the intra-chunk work (SPLIT)."""
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", split)
    prefill, decode = tiny_quant_through_kernels(emulated_metal, lambda: monkeypatch.setattr(mx.metal, "is_available",
                                                                                             lambda: False))
    kda = [(k, t) for k, t in prefill if not k.startswith("mla_")]
    mla = [k for k, _ in prefill if k.startswith("mla_")]
    assert [k for k, _ in kda] == ["prefill"] * 3  # one dispatch per KDA layer
    assert mla == ["mla_prefill"]  # the MLA layer: 65 queries, expanded form
    assert all(t["HAS_INIT"] is False and t["K"] == 64 for _, t in kda)
    assert all(t["SPLIT"] is (split == "1") for _, t in kda)
    kda = [(k, t) for k, t in decode if not k.startswith("mla_")]
    assert [k for k, _ in kda] == ["decode"] * 6
    assert [k for k, _ in decode if k.startswith("mla_")] == ["mla_decode", "mla_combine"] * 2
    assert all(t["GATED"] for _, t in kda)


def test_kernel_decode_layers_as_one_piece_through_emulated_metal(emulated_metal, monkeypatch):
    """The GPU's decode step: each layer one piece with its kernels inside (kernels_traceable;
    mx.compile left out here, the emulator reads its inputs on the host). A KDA layer's kernel
    then runs the short convs (KC) and the second projections of f and the gate (LR) too: same
    logits as the MLX-ops path, and the cache's conv state carries from step to step."""
    import kimi_mlx.model.kimi_linear as kl

    monkeypatch.setenv("KIMI_MLX_COMPILE", "on")
    monkeypatch.setattr(kl, "kernels_traceable", lambda: True)
    monkeypatch.setattr(mx, "compile", lambda fn, *a, **k: fn)
    _, decode = tiny_quant_through_kernels(emulated_metal, lambda: monkeypatch.setattr(mx.metal, "is_available",
                                                                                       lambda: False))
    kda = [t for k, t in decode if not k.startswith("mla_")]
    assert len(kda) == 6 and all(t["KC"] == 4 and t["LR"] and t["GATED"] for t in kda)
    assert [k for k, _ in decode if k.startswith("mla_")] == ["mla_decode", "mla_combine"] * 2


@pytest.mark.parametrize("head_dim", [16, 32])
def test_deferred_conv_matches_the_plain_path(emulated_metal, head_dim):
    """A decode token's short convs and second projections left to the kernel (defer_conv): with
    K = 32 the kernel runs them (8-bit f_b / g_b, dequantized once for it); with K = 16 it does
    not take the shape and they run as MLX ops. Either way the output, state and conv state of
    the plain path."""
    import json

    import mlx.nn as nn

    from kimi_mlx.config import ModelConfig
    from kimi_mlx.model.kda import DeferredConv, KimiDeltaAttention

    raw = json.loads((MODELS / "tiny_quant" / "config.json").read_text())
    raw["linear_attn_config"]["head_dim"] = head_dim
    attn = KimiDeltaAttention(ModelConfig.from_dict(raw))
    mx.random.seed(0)
    attn.update(tree_map(lambda a: 0.3 * mx.random.normal(a.shape), attn.parameters()))
    if head_dim % 32 == 0:  # (quantization groups of 32 inputs)
        nn.quantize(attn, group_size=32, bits=8, class_predicate=lambda p, m: p in ("f_b_proj", "g_b_proj"))
        assert isinstance(attn.f_b_proj, nn.QuantizedLinear)
    H, K, d = attn.num_heads, attn.head_dim, raw["hidden_size"]
    x = mx.random.normal((2, 1, d))
    conv = mx.random.normal((2, 3, 3 * H * K))
    state = mx.random.normal((2, H, K, K))
    deferred = attn.decode_project(x, conv, defer_conv=True)
    assert isinstance(deferred[0], DeferredConv)
    got = attn.gated_delta(deferred, state)
    want = attn.gated_delta(attn.decode_project(x, conv), state)
    launched = [t for k, t in emulated_metal]
    if K == 16:
        assert launched == []
    else:  # the deferred step, then the plain path's own kernel (convs and projections outside)
        assert [(t["KC"], t["LR"]) for t in launched] == [(4, True), (0, False)]
    assert [a.shape for a in got] == [a.shape for a in want]
    for a, b in zip(got, want):
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-4).item()


def test_kernel_split_dispatch_rules(monkeypatch):
    """SPLIT (slices of a head share the intra-chunk work): on by default on CUDA only, never
    with one slice, and not when one call's scratch would pass the cap."""
    monkeypatch.delenv("KIMI_MLX_KDA_SPLIT", raising=False)
    assert metal_kernels._use_split("cuda", 4, 1 << 20)
    assert not metal_kernels._use_split("metal", 4, 1 << 20)
    assert not metal_kernels._use_split("cuda", 1, 1 << 20)
    assert not metal_kernels._use_split("cuda", 4, metal_kernels._SPLIT_MAX_BYTES + 1)
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", "0")
    assert not metal_kernels._use_split("cuda", 4, 1 << 20)
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", "1")
    assert metal_kernels._use_split("metal", 4, 1 << 20)
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", "off")  # "off" means the same as everywhere else
    assert not metal_kernels._use_split("cuda", 4, 1 << 20)
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", "on")
    assert metal_kernels._use_split("metal", 4, 1 << 20)
    # every call's sync slots start at a different value (mx.compile cannot merge two of them)
    assert len({metal_kernels._sync_value() for _ in range(5)}) == 5
