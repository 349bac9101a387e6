"""CPU fast paths (kimi_mlx.ops.cpu_fast) against the plain MLX / mlx-lm modules they replace."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from kimi_mlx.model.switch import SwitchGLU
from kimi_mlx.ops import cpu_fast
from kimi_mlx.model.switch import CPUSwitchGLU
from kimi_mlx.ops.cpu_fast import (LINEAR_MIN_ROWS, SWITCH_MIN_PAIRS, CPULinear, CPUQuantizedLinear,
                                   cpu_fast_path_wanted, dequantize_fp32, disable_cpu_fast_path,
                                   enable_cpu_fast_path, switch_glu_blocks, switch_glu_reference)

ROWS = [1, 7, 16, 33, 100]


def close(a, b, tol):
    a, b = np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32))
    scale = max(1.0, float(np.abs(b).max()))
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= tol * scale, float(np.abs(a - b).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dequantize_matches_mlx(bits, group_size, dtype):
    mx.random.seed(0)
    w = (mx.random.normal((3, 37, 192)) * 0.1).astype(dtype)
    q, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    ours = dequantize_fp32(q, s, b, group_size, bits)
    # bf16 scales: mx.dequantize rounds to bf16, ours stays fp32, so compare with fp32 scales
    ref = mx.dequantize(q, s.astype(mx.float32), b.astype(mx.float32), group_size=group_size, bits=bits)
    assert ours.dtype == mx.float32
    assert float(mx.abs(ours - ref).max()) < 1e-6


def test_dequantize_other_modes_fall_back():
    w = mx.random.normal((8, 64))
    q, s = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
    ref = mx.dequantize(q, s, group_size=32, bits=4, mode="mxfp4")
    assert mx.allclose(dequantize_fp32(q, s, None, 32, 4, "mxfp4"), ref).item()


def _quantized_linear(i, o, bias, group_size=32, bits=4):
    mx.random.seed(1)
    lin = nn.Linear(i, o, bias=bias)
    lin.weight = mx.random.normal((o, i)) * i ** -0.5
    if bias:
        lin.bias = mx.random.normal((o,))
    return nn.QuantizedLinear.from_linear(lin, group_size=group_size, bits=bits)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_linear(rows, bias):
    q = _quantized_linear(96, 67, bias)
    x = mx.random.normal((rows, 96))
    plain = q(x)
    q.__class__ = CPUQuantizedLinear
    close(q(x), plain, 1e-4)


def test_quantized_linear_batched_bf16_input():
    q = _quantized_linear(128, 45, False, group_size=64, bits=8)
    x = mx.random.normal((3, 11, 128)).astype(mx.bfloat16)
    plain = q(x)
    q.__class__ = CPUQuantizedLinear
    fast = q(x)
    assert fast.shape == (3, 11, 45)
    close(fast, plain, 2e-2)  # the plain path rounds its output to bf16


@pytest.mark.parametrize("rows", ROWS)
def test_bf16_linear(rows):
    mx.random.seed(2)
    lin = nn.Linear(80, 33)
    lin.update({"weight": lin.weight.astype(mx.bfloat16), "bias": lin.bias.astype(mx.bfloat16)})
    x = mx.random.normal((2, rows, 80))
    ref = x @ lin.weight.astype(mx.float32).T + lin.bias.astype(mx.float32)
    lin.__class__ = CPULinear
    y = lin(x)
    assert y.dtype == mx.float32
    close(y, ref, 2e-2)  # few rows multiply in bf16


def _glu(quantized: bool, dtype=mx.float32, E=6, D=64, F=40, group_size=32):
    mx.random.seed(3)
    glu = SwitchGLU(D, F, E)
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(glu, name)
        lin.weight = (mx.random.normal(lin.weight.shape) * lin.weight.shape[-1] ** -0.5).astype(dtype)
    if quantized:
        nn.quantize(glu, group_size=group_size, bits=4, class_predicate=lambda p, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % group_size == 0)
    return glu


def _route(shape, E, k):
    rng = np.random.default_rng(sum(shape))
    return mx.array(np.stack([rng.permutation(E)[:k] for _ in range(int(np.prod(shape)))]).reshape(*shape, k))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("quantized", [False, True])
def test_switch_glu_blocks(rows, quantized):
    glu = _glu(quantized)
    x = mx.random.normal((rows, 64))
    idx = _route((rows,), 6, 3)
    ref = switch_glu_reference(glu, x, idx)
    for min_rows in (1, 8, 10 ** 6):  # every expert dequantized / mixed / every expert quantized
        close(switch_glu_blocks(glu, x, idx, min_rows=min_rows), ref, 1e-4)


@pytest.mark.parametrize("quantized", [False, True])
def test_switch_glu_swapped_batched(quantized):
    glu = _glu(quantized)
    x = mx.random.normal((2, 45, 64))  # 180 pairs: the block path
    idx = _route((2, 45), 6, 2)
    ref = glu(x, idx)
    glu.__class__ = CPUSwitchGLU
    out = glu(x, idx)
    assert out.shape == (2, 45, 2, 64)
    close(out, ref, 1e-4)
    close(glu(x[:, :3], idx[:, :3]), ref[:, :3], 1e-4)  # few pairs: the plain gather path


def test_switch_glu_bf16_runs_on_cpu():
    # CPU gather_mm only takes fp32: bf16 experts must still work, via blocks
    glu16 = _glu(False, mx.bfloat16)
    glu32 = _glu(False, mx.bfloat16)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(glu32, name).weight = getattr(glu32, name).weight.astype(mx.float32)
    x = mx.random.normal((1, 5, 64))
    idx = _route((1, 5), 6, 2)
    ref = glu32(x, idx)
    glu16.__class__ = CPUSwitchGLU
    close(glu16(x, idx), ref, 3e-2)


def test_enable_and_disable_swap_classes():
    model = nn.Sequential(_quantized_linear(64, 16, False), nn.Linear(16, 16), _glu(True))
    model.layers[1].weight = model.layers[1].weight.astype(mx.bfloat16)
    counts = enable_cpu_fast_path(model)
    assert counts == {"CPUQuantizedLinear": 1, "CPULinear": 1, "CPUSwitchGLU": 1}
    assert type(model.layers[0]) is CPUQuantizedLinear
    assert enable_cpu_fast_path(model) == {}  # idempotent
    disable_cpu_fast_path(model)
    assert type(model.layers[0]) is nn.QuantizedLinear and type(model.layers[2]) is SwitchGLU


# odd shapes: widths that are no multiple of anything, rows at the thresholds, experts left idle,
# a mix of quantized and dense experts (the down projection's width 72 doesn't divide by 32)
@pytest.mark.parametrize("rows", [LINEAR_MIN_ROWS - 1, LINEAR_MIN_ROWS, 13])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, 64), (2, 32), (3, 64)])
def test_quantized_linear_odd(rows, bits, group_size):
    q = _quantized_linear(192, 53, True, group_size=group_size, bits=bits)
    x = mx.random.normal((1, rows, 192), key=mx.random.key(rows))
    plain = q(x)
    q.__class__ = CPUQuantizedLinear
    fast = q(x)
    assert fast.shape == (1, rows, 53)
    close(fast, plain, 1e-4)


@pytest.mark.parametrize("rows,k", [(1, 1), (5, 3), (21, 3), (SWITCH_MIN_PAIRS // 4, 4), (37, 5)])
@pytest.mark.parametrize("quantized", [False, True])
def test_switch_glu_odd(rows, k, quantized):
    glu = _glu(quantized, E=7, D=96, F=72)
    if quantized:
        assert "scales" in glu.gate_proj and "scales" not in glu.down_proj  # mixed
    x = mx.random.normal((1, rows, 96), key=mx.random.key(rows))
    idx = _route((1, rows), 7, k)
    ref = switch_glu_reference(glu, x, idx)
    glu.__class__ = CPUSwitchGLU
    out = glu(x, idx)
    assert out.shape == (1, rows, k, 96)
    close(out, ref, 1e-4)


# ---------------------------------------------------------------------------
# automatic switch in load_model
# ---------------------------------------------------------------------------
def test_wanted_env_and_blas(monkeypatch):
    from kimi_mlx import _blas

    monkeypatch.setenv(cpu_fast.ENV_VAR, "off")
    assert cpu_fast_path_wanted()[0] is False
    if mx.default_device().type != mx.DeviceType.cpu:
        return
    monkeypatch.setenv(cpu_fast.ENV_VAR, "on")
    assert cpu_fast_path_wanted()[0] is True
    monkeypatch.delenv(cpu_fast.ENV_VAR)
    monkeypatch.setattr(_blas, "blas_info", lambda: {"loaded": True})
    assert cpu_fast_path_wanted() == (True, "CPU with an optimized BLAS")
    monkeypatch.setattr(_blas, "blas_info", lambda: {"loaded": False})
    assert cpu_fast_path_wanted(_glu(True))[0] is False  # reference BLAS: not faster
    assert cpu_fast_path_wanted(_glu(False, mx.bfloat16))[0] is True  # the plain path can't run these


def test_load_model_enables_it(monkeypatch):
    from helpers import MODELS

    from kimi_mlx import load_model

    monkeypatch.setenv(cpu_fast.ENV_VAR, "on")
    model = load_model(MODELS / "tiny_grouped", dtype=mx.bfloat16)
    if mx.default_device().type == mx.DeviceType.cpu:
        assert model.cpu_fast_path.enabled and model.cpu_fast_path.swapped.get("CPUSwitchGLU")
        assert any(isinstance(m, CPUSwitchGLU) for _, m in model.named_modules())
    monkeypatch.setenv(cpu_fast.ENV_VAR, "off")
    model = load_model(MODELS / "tiny_grouped")
    assert not model.cpu_fast_path.enabled
    assert not any(isinstance(m, (CPUSwitchGLU, CPULinear)) for _, m in model.named_modules())
    assert not any(isinstance(m, CPUSwitchGLU) for _, m in load_model(MODELS / "tiny_grouped", cpu_fast_path=False)
                   .named_modules())


# ---------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_quantized():
    pytest.importorskip("kimi_mlx.ops.kda")
    from helpers import MODELS

    from kimi_mlx import load_model

    model = load_model(MODELS / "tiny_grouped", cpu_fast_path=False)  # the plain path first
    # tiny widths: group size 32 where the input width divides, the rest stays fp32
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0
                and not isinstance(m, nn.Embedding))
    mx.eval(model.parameters())
    return model


def test_quantized_model_same_logits(tiny_quantized):
    model = tiny_quantized
    rng = np.random.default_rng(0)
    ids = mx.array(rng.integers(0, model.config.vocab_size, (2, 40)))

    def run():
        cache = model.make_cache()
        outs = [model(ids[:, :33], cache=cache)]
        for t in range(33, 40):  # decode: few rows, the quantized kernels
            outs.append(model(ids[:, t:t + 1], cache=cache))
        return mx.concatenate(outs, axis=1)

    plain = run()
    counts = enable_cpu_fast_path(model)
    try:
        assert counts.get("CPUQuantizedLinear", 0) > 0 and counts.get("CPUSwitchGLU", 0) > 0
        fast = run()
    finally:
        disable_cpu_fast_path(model)
    close(fast, plain, 1e-3)
    assert (np.argmax(np.asarray(fast), -1) == np.argmax(np.asarray(plain), -1)).mean() > 0.97


def test_bf16_model_runs_on_cpu():
    pytest.importorskip("kimi_mlx.ops.kda")
    from helpers import MODELS

    from kimi_mlx import load_model

    from mlx.utils import tree_map

    # reference: the same bf16-rounded weights, run in fp32 (rounding alone moves these logits a lot)
    ref = load_model(MODELS / "tiny_grouped", dtype=mx.bfloat16, cpu_fast_path=False)
    ref.update(tree_map(lambda a: a.astype(mx.float32), ref.parameters()))
    model = load_model(MODELS / "tiny_grouped", dtype=mx.bfloat16)  # the fast path comes on by itself
    enable_cpu_fast_path(model)
    ids = mx.array(np.random.default_rng(1).integers(0, 640, (1, 24)))
    close(model(ids), ref(ids), 5e-2)
    cache = model.make_cache()  # prefill, then decode steps (few rows: the bf16 matmuls)
    outs = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, 24)]
    close(mx.concatenate(outs, axis=1), ref(ids), 5e-2)


def test_cached_latents_keep_model_dtype():
    # the fast path computes in fp32, but the layer whose output is cached returns the model's dtype:
    # a bf16 model keeps a bf16 MLA cache (half the bytes)
    from helpers import MODELS

    from kimi_mlx import load_model

    model = load_model(MODELS / "tiny_grouped", dtype=mx.bfloat16, cpu_fast_path=True)
    cache = model.make_cache()
    ids = mx.array(np.random.default_rng(2).integers(0, 640, (1, 20)))
    model(ids, cache=cache)
    model(ids[:, :1], cache=cache)
    pages = [c.blocks()[0] for c in cache if c.kind == "mla"]
    assert pages and all(p.dtype == mx.bfloat16 for p in pages)


@pytest.mark.parametrize("mode,bits", [("affine", 4), ("mxfp4", 4)])
def test_keep_dtype_layer(mode, bits):
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv_a_proj_with_mqa = nn.Linear(64, 24, bias=False)

    m = Attn()
    m.kv_a_proj_with_mqa.weight = m.kv_a_proj_with_mqa.weight.astype(mx.bfloat16)
    nn.quantize(m, group_size=32, bits=bits, mode=mode)
    x = mx.random.normal((2, 9, 64))
    plain = m.kv_a_proj_with_mqa(x)
    enable_cpu_fast_path(m, force=True)
    assert m.kv_a_proj_with_mqa.keep_dtype
    out = m.kv_a_proj_with_mqa(x)
    assert out.dtype == (mx.bfloat16 if mode == "affine" else mx.float32)  # no float scales: x's dtype
    close(out, plain, 2e-2)
