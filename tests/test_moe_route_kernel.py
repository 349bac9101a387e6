"""The MoE routing kernel (metal_kernels/moe_template.py) through its launch code
(metal_kernels/moe.py), its Metal and its CUDA text executed on the CPU (emulated threadgroups),
against route's MLX ops (route_reference in kimi_mlx/model/moe.py). mx.argpartition picks in no set order, so the
picks are compared as sets per row, each with its weight; the kernel's own order (descending
choice, ties to the lower expert) is checked against numpy."""
import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
from kimi_mlx.model import moe as M
from metal_kernels import moe as K
from metal_kernels.emulate import cxx
from test_kernel_dispatch import _EmulatedKernel

pytestmark = [pytest.mark.skipif(cxx() is None, reason="no C++ compiler"),
              # the emulator fills outputs with NaN first, which numpy casts to uint32 with a warning
              pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")]


@pytest.fixture(params=["metal", "cuda"])
def emu(request, monkeypatch):
    """metal_kernels believes it is on an Apple (metal) or NVIDIA (cuda) GPU; its kernels run
    through that rendering's emulator. Returns the log of launches (kind, template)."""
    be, log = request.param, []
    for var in ("KIMI_MLX_MOE_ROUTE", "KIMI_MLX_KDA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: be == "metal")
    monkeypatch.setattr(mx.cuda, "is_available", lambda: be == "cuda")

    def kernel(b, kind, shared_memory=0, prof=False, max_threads=0):
        assert b == be
        return _EmulatedKernel(kind, log, b, shared_memory)

    monkeypatch.setattr(metal_kernels, "_kernel", kernel)
    assert K.backend() == be
    return log


def _inputs(N, E, seed, bias_scale=0.4):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((N, E)).astype(np.float32) * 2
    bias = rng.uniform(0, bias_scale, E).astype(np.float32)
    return logits, bias


def _choice64(logits, bias):
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    return s, s + bias.astype(np.float64)


def _by_expert(inds, weights):
    """Each row's picks in ascending expert order, with their weights."""
    order = np.argsort(inds, axis=-1, kind="stable")
    return np.take_along_axis(inds, order, -1), np.take_along_axis(weights, order, -1)


def _check_against_route(inds, weights, logits, bias, k, renorm, scaling):
    ri, rw = M.route_reference(mx.array(logits), mx.array(bias), k, 1, 1, renorm, scaling)
    assert inds.dtype == ri.dtype == mx.uint32 and weights.dtype == mx.float32
    assert inds.shape == ri.shape and weights.shape == rw.shape
    ki, kw = _by_expert(np.array(inds), np.array(weights))
    ri, rw = _by_expert(np.array(ri), np.array(rw))
    np.testing.assert_array_equal(ki, ri)
    np.testing.assert_allclose(kw, rw, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("E,k,N,renorm,scaling", [
    (256, 8, 1, True, 2.446),   # the real model: 256 experts, 8 picks, renormalised, scaled
    (256, 8, 3, True, 2.446),
    (256, 8, 37, True, 2.446),
    (16, 2, 1, False, 1.5),     # one warp, no barrier; plain scores
    (16, 2, 37, False, 1.5),
    (64, 6, 3, False, 0.7),     # two warps
    (64, 6, 37, False, 0.7),
    (200, 8, 3, True, 1.0),     # a part-filled warp (200 experts, 224 threads)
    (1000, 32, 3, True, 2.0),   # 4 experts a thread, the most picks
])
def test_moe_route_kernel_matches_route(emu, E, k, N, renorm, scaling):
    logits, bias = _inputs(N, E, seed=E + 7 * k + N)
    inds, weights = K.moe_route(mx.array(logits), mx.array(bias), k, renorm, scaling)
    assert [(kind, t["E"], t["K"], t["RENORM"]) for kind, t in emu] == [("moe_route", E, k, renorm)]
    _check_against_route(inds, weights, logits, bias, k, renorm, scaling)
    # the bias changed the picks (so neither an ignored bias nor weights of choice would pass)
    s, c = _choice64(logits, bias)
    by_score = np.sort(np.argsort(-s, axis=-1)[:, :k], axis=-1)
    assert (by_score != np.sort(np.array(inds), axis=-1)).any()
    # the kernel's order: descending choice
    picked = np.take_along_axis(c, np.array(inds).astype(np.int64), -1)
    assert (np.diff(picked, axis=-1) <= 1e-6).all()


def test_moe_route_kernel_ties_go_to_the_lower_expert(emu):
    """Logits and biases on a coarse grid: many experts share a choice exactly (the same sums of
    the same values), also across the k-th pick. The kernel takes the lower experts first."""
    rng = np.random.default_rng(3)
    N, E, k, scaling = 37, 64, 6, 2.5
    logits = (rng.integers(-2, 3, (N, E)) * 0.5).astype(np.float32)
    bias = (rng.integers(0, 2, E) * 0.25).astype(np.float32)
    s, c = _choice64(logits, bias)
    distinct = np.unique(np.round(c, 9))
    assert np.diff(distinct).min() > 1e-4  # distinct choices lie far apart; equal ones are exactly equal
    inds, weights = K.moe_route(mx.array(logits), mx.array(bias), k, True, scaling)
    ex = np.arange(E)
    order = np.stack([np.lexsort((ex, -c[r]))[:k] for r in range(N)])  # descending, ties ascending
    np.testing.assert_array_equal(np.array(inds), order)
    w = np.take_along_axis(s, order, -1)
    np.testing.assert_allclose(np.array(weights), w / w.sum(-1, keepdims=True) * scaling, rtol=1e-6)
    srt = np.sort(c, axis=-1)[:, ::-1]
    assert (srt[:, k - 1] == srt[:, k]).any()  # some rows' ties straddle the k-th pick
    clear = srt[:, k - 1] > srt[:, k] + 1e-4  # rows where any correct pick agrees as a set
    assert clear.any()
    ri, _ = M.route_reference(mx.array(logits[clear]), mx.array(bias), k, 1, 1, True, scaling)
    np.testing.assert_array_equal(np.sort(np.array(inds)[clear], -1), np.sort(np.array(ri), -1))


def test_moe_route_dispatch(emu, monkeypatch):
    """route takes the kernel on a GPU without group limiting ([B, T, E] logits kept as they are),
    the MLX ops with it, with KIMI_MLX_MOE_ROUTE=reference, on the CPU, and for what the kernel
    doesn't take."""
    E, k = 64, 6
    logits, bias = _inputs(3, E, seed=11)
    lg, b = mx.array(logits)[None], mx.array(bias)
    # the CPU device (as in every other emulated test): MLX ops, no launch
    M.route(lg, b, k, 1, 1, False, 0.7)
    assert emu == []
    monkeypatch.setattr(M, "_on_gpu", lambda: True)
    for n_group, topk_group in ((1, 1), (4, 4)):
        inds, weights = M.route(lg, b, k, n_group, topk_group, False, 0.7)
        assert [kind for kind, _ in emu] == ["moe_route"] and inds.shape == weights.shape == (1, 3, k)
        _check_against_route(inds[0], weights[0], logits, bias, k, False, 0.7)
        emu.clear()
    M.route(lg, b, k, 4, 2, False, 0.7)  # group limiting: MLX ops
    assert emu == []
    monkeypatch.setenv("KIMI_MLX_MOE_ROUTE", "reference")
    assert K.moe_route(lg, b, k, False, 0.7) is None
    M.route(lg, b, k, 1, 1, False, 0.7)
    assert emu == []
    monkeypatch.delenv("KIMI_MLX_MOE_ROUTE")
    big = mx.zeros((1, 2048))
    for args in ((lg.astype(mx.bfloat16), b, k), (big, mx.zeros((2048,)), 8), (lg, b, 33), (lg[..., :4], b[:4], 5)):
        assert K.moe_route(*args, True, 1.0) is None
    assert emu == []


def test_moe_route_no_kernel_on_the_cpu(monkeypatch):
    monkeypatch.delenv("KIMI_MLX_MOE_ROUTE", raising=False)
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    if metal_kernels.backend() is not None:
        pytest.skip("a GPU backend is here")
    lg, b = mx.zeros((1, 16)), mx.zeros((16,))
    assert K.moe_route(lg, b, 2, True, 1.0) is None
    monkeypatch.setattr(M, "_on_gpu", lambda: True)
    inds, weights = M.route(lg, b, 2, 1, 1, True, 1.0)
    assert inds.shape == (1, 2) and np.allclose(np.array(weights), 0.5)


def test_moe_route_sources_one_algorithm_two_dialects():
    from metal_kernels import moe_template as T
    from metal_kernels.dialect import CUDA, METAL

    (mh, mb), (ch, cb) = T.render(METAL, "moe_route"), T.render(CUDA, "moe_route")
    for d, b in ((METAL, mb), (CUDA, cb)):
        assert b == T.ROUTE_BODY.replace("/*@PROLOGUE@*/", d.prologue)
    assert T.MOE_HEADER in mh and T.MOE_HEADER in ch
    for word in ("__syncthreads", "__shfl_xor_sync", "expf("):
        assert word not in mh + mb
    for word in ("threadgroup_barrier", "simd_shuffle", "metal::"):
        assert word not in ch + cb
