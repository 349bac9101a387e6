"""KDA operator: recurrent reference vs chunked form vs FLA golden outputs."""
from __future__ import annotations

import importlib

import numpy as np
import pytest

import mlx.core as mx

from helpers import FIXTURES, make_inputs, max_abs
from kimi_mlx import _native
from kimi_mlx.ops.kda import kda
from kimi_mlx.ops.kda_chunked import kda_chunked
from kimi_mlx.ops.kda_cpu import kda_cpu
from kimi_mlx.ops.kda_reference import kda_recurrent, kda_step

TOL = 1e-5
kda_mod = importlib.import_module("kimi_mlx.ops.kda")  # the module, even if ops/ re-exports kda()
# Our C kernel (more in test_kda_cpu_kernel.py): where a compiler exists it must build and pass.
CPU_KERNEL = pytest.param(kda_cpu, id="cpu_kernel",
                          marks=pytest.mark.skipif(_native.compiler() is None, reason="no C compiler"))


CONFIGS = [
    # B, H, K, V, initial state
    (1, 2, 16, 24, False),
    (2, 3, 32, 24, True),
]


@pytest.mark.parametrize("T", [1, 17, 63, 64, 65, 300])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["b1h2k16", "b2h3k32_state"])
def test_chunked_matches_recurrent(T, cfg):
    B, H, K, V, state = cfg
    args, s0 = make_inputs(B, T, H, K, V, seed=T, state=state)
    o_ref, s_ref = kda_recurrent(*args, initial_state=s0)
    o, s = kda_chunked(*args, initial_state=s0)
    assert o.shape == (B, T, H, V) and o.dtype == mx.float32
    assert s.shape == (B, H, K, V) and s.dtype == mx.float32
    assert max_abs(o, o_ref) < TOL
    assert max_abs(s, s_ref) < TOL


@pytest.mark.parametrize("chunk_size", [16, 32, 128])
def test_chunk_sizes(chunk_size):
    args, s0 = make_inputs(2, 150, 2, 16, 8, seed=3, state=True)
    o_ref, s_ref = kda_recurrent(*args, initial_state=s0)
    o, s = kda_chunked(*args, initial_state=s0, chunk_size=chunk_size)
    assert max_abs(o, o_ref) < TOL and max_abs(s, s_ref) < TOL


@pytest.mark.parametrize("fn", [kda_chunked, CPU_KERNEL])
def test_extreme_gates(fn):
    """Gates from 0 down to -1e4 and -inf: nothing overflows, results stay exact."""
    args, s0 = make_inputs(1, 130, 2, 16, 24, seed=5, g_range=(-60.0, -1e-4), state=True)
    q, k, v, g, beta = args
    rng = np.random.default_rng(6)
    u = mx.array(rng.uniform(size=g.shape).astype(np.float32))
    g = mx.where(u < 0.05, 0.0, mx.where(u > 0.97, -1e4, mx.where(u > 0.96, -mx.inf, g)))
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    o, s = fn(q, k, v, g, beta, initial_state=s0)
    assert not bool(mx.isnan(o).any()) and not bool(mx.isnan(s).any())
    assert max_abs(o, o_ref) < TOL and max_abs(s, s_ref) < TOL


@pytest.mark.parametrize("split", [1, 40, 64, 100])
def test_state_carry(split):
    """Two calls with the state passed along equal one call, for both forms."""
    args, s0 = make_inputs(2, 150, 2, 16, 24, seed=7, state=True)
    o_all, s_all = kda_recurrent(*args, initial_state=s0)
    first = [a[:, :split] for a in args]
    second = [a[:, split:] for a in args]
    for fn in (kda_chunked, kda_recurrent):
        o1, s1 = fn(*first, initial_state=s0)
        o2, s2 = fn(*second, initial_state=s1)
        assert max_abs(mx.concatenate([o1, o2], axis=1), o_all) < TOL
        assert max_abs(s2, s_all) < TOL


def test_segments(monkeypatch):
    """Long inputs are processed in segments; force several."""
    import kimi_mlx.ops.kda_chunked as kc

    monkeypatch.setattr(kc, "_SEGMENT_ELEMS", 2 * 2 * 32 * 2)
    args, s0 = make_inputs(2, 200, 2, 16, 24, seed=8, state=True)
    o_ref, s_ref = kda_recurrent(*args, initial_state=s0)
    o, s = kc.kda_chunked(*args, initial_state=s0, chunk_size=32)
    assert max_abs(o, o_ref) < TOL and max_abs(s, s_ref) < TOL


def test_step_matches_recurrent():
    args, s0 = make_inputs(2, 1, 3, 32, 24, seed=9, state=True)
    o_ref, s_ref = kda_recurrent(*args, initial_state=s0)
    o, s = kda_step(*args, initial_state=s0)
    assert o.shape == (2, 1, 3, 24)
    assert max_abs(o, o_ref) < 1e-6 and max_abs(s, s_ref) < 1e-6
    with pytest.raises(ValueError):
        kda_step(*make_inputs(1, 2, 2, 16, 16)[0])


def test_scale_argument():
    args, _ = make_inputs(1, 40, 2, 16, 24, seed=10)
    o_ref, _ = kda_recurrent(*args, scale=0.3)
    o, _ = kda_chunked(*args, scale=0.3)
    o_def, _ = kda_chunked(*args)
    assert max_abs(o, o_ref) < TOL
    assert max_abs(o, o_def) > 1e-3


@pytest.mark.parametrize("fn", [kda_recurrent, kda_chunked, kda, CPU_KERNEL],
                         ids=["recurrent", "chunked", "dispatch", "cpu_kernel"])
def test_fla_golden(fn):
    """FLA's naive_recurrent_kda (fp64) outputs, recorded by fixtures/make_kda_reference.py."""
    data = np.load(FIXTURES / "kda_golden.npz")
    names = sorted({key.split("/")[0] for key in data.files})
    assert names
    for name in names:
        get = lambda key: mx.array(data[f"{name}/{key}"])  # noqa: E731
        s0 = get("s0") if f"{name}/s0" in data.files else None
        o, s = fn(get("q"), get("k"), get("v"), get("g"), get("beta"), initial_state=s0)
        assert max_abs(o, data[f"{name}/o"]) < TOL, name
        assert max_abs(s, data[f"{name}/state"]) < TOL, name


@pytest.mark.parametrize("fn", [kda_recurrent, kda_chunked, CPU_KERNEL])
def test_bf16_inputs(fn):
    args32, s0 = make_inputs(1, 70, 2, 32, 24, seed=11, state=True)
    args16 = [a.astype(mx.bfloat16) for a in args32]
    o, s = fn(*args16, initial_state=s0)
    assert o.dtype == mx.bfloat16 and s.dtype == mx.float32
    # Reference: the same bf16-rounded inputs in fp32.
    o_ref, s_ref = kda_recurrent(*[a.astype(mx.float32) for a in args16], initial_state=s0)
    scale_o = float(mx.abs(o_ref).max())
    assert max_abs(o.astype(mx.float32), o_ref) < 2e-2 * scale_o
    assert max_abs(s, s_ref) < 1e-5 * max(1.0, float(mx.abs(s_ref).max()))


def test_dispatch(monkeypatch):
    args, s0 = make_inputs(1, 20, 2, 16, 24, seed=12, state=True)
    o_ref, s_ref = kda_recurrent(*args, initial_state=s0)
    for T in (1, 3, 20):
        o, s = kda(*[a[:, :T] for a in args], initial_state=s0)
        o_r, s_r = kda_recurrent(*[a[:, :T] for a in args], initial_state=s0)
        assert max_abs(o, o_r) < TOL and max_abs(s, s_r) < TOL

    calls = []
    monkeypatch.setattr(kda_mod, "kda_recurrent", lambda *a: calls.append("ref") or kda_recurrent(*a))
    monkeypatch.setenv("KIMI_MLX_KDA", "reference")
    o, s = kda(*args, initial_state=s0)
    assert calls == ["ref"] and max_abs(o, o_ref) < TOL

    assert kda_mod.kernel_backend() is None  # forced off
