"""The CUDA rendering of the kernels executed on the CPU (metal_kernels/cuda_stub.h: threads,
named barriers, shuffles, votes, ldmatrix, mma.sync, cp.async emulated), through the same
launch code as on an NVIDIA GPU, against float64 / fp32 references. The Metal twins of these
checks are in test_mla_kernels.py, test_kernel_emulated.py and test_kernel_dispatch.py; the
fragment tests below pin the emulated register layouts to numpy, and the sabotage tests show
that a wrong layout, a missing cp.async wait or a broken barrier fails here."""
import re

import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
import test_mla_kernels as MT
from kimi_mlx.ops import attention as A
from metal_kernels import mla as K
from metal_kernels import sources
from metal_kernels.dialect import CUDA, PREC_BF16, PREC_TF32, PREC_TF32X3
from metal_kernels.emulate import (conv_decode_case, cxx, gates_np, kda_np, low_rank_decode_case, rel_err,
                                   round_to, run_cuda_body)
from test_kernel_dispatch import _EmulatedKernel, tiny_quant_through_kernels

pytestmark = pytest.mark.skipif(cxx() is None, reason="no C++ compiler")

D, DL, DV = MT.D, MT.DL, MT.DV


@pytest.fixture
def cuda_emu(monkeypatch):
    """metal_kernels believes it is on an NVIDIA GPU; its kernels run through the CUDA emulator."""
    log = []
    for var in ("KIMI_MLX_MLA", "KIMI_MLX_KDA", "KIMI_MLX_KDA_SPLIT", "KIMI_MLX_KDA_NT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)

    def kernel(be, kind, shared_memory=0, prof=False, max_threads=0):
        assert be == "cuda"
        return _EmulatedKernel(kind, log, be, shared_memory)

    monkeypatch.setattr(metal_kernels, "_kernel", kernel)
    assert metal_kernels.backend() == "cuda" and K.backend() == "cuda"
    return log


def _params_of(test, argnames):
    """The parametrisation of a Metal test (kept in one place)."""
    return next(m.args[1] for m in test.pytestmark if m.name == "parametrize" and m.args[0] == argnames)


def _rel(out, ref) -> float:
    out, ref = np.asarray(out.astype(mx.float32), np.float64), np.asarray(ref.astype(mx.float32), np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# ---------------------------------------------------------------------------------------------
# MLA (launch code in metal_kernels/mla.py)

@pytest.mark.parametrize("B,H,T,appends,bits,splits",
                         _params_of(MT.test_kernel_mla_decode_matches_reference, "B,H,T,appends,bits,splits"))
# bf16: bf16 tiles, ldmatrix, bf16 products, cp.async key tiles; fp32: fp32 tiles (cp.async too), 3xtf32.
# groups 2: two warp groups a block, each on its own split, with named barriers
# nw 16: sixteen warps, each on half of a tile's keys in S
@pytest.mark.parametrize("nbuf,bk,groups,nw", [("1", "32", "1", "8"), ("2", "32", "1", "8"), ("2", "64", "1", "8"),
                                               ("2", "64", "2", "8"), ("2", "64", "1", "16"), ("1", "32", "1", "16")])
@pytest.mark.parametrize("dt", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_cuda_mla_decode(cuda_emu, monkeypatch, B, H, T, appends, bits, splits, nbuf, bk, groups, nw, dt):
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_GROUPS", groups)
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_NW", nw)
    out, ref = MT.decode_case(monkeypatch, B, H, T, appends, bits, splits, nbuf, bk, dt)
    decodes = [t for k, t in cuda_emu if k == "mla_decode"]
    assert decodes and [k for k, _ in cuda_emu if k != "mla_decode"] == ["mla_combine"]
    assert all(t["Q8"] == (bits == 8) and t["NBUF"] == (1 if t["Q8"] else int(nbuf)) and t["BK"] == int(bk)
               and t["G"] == int(groups) and t["NW"] == int(nw) and t["PR"] == (PREC_BF16 if dt == mx.bfloat16 else PREC_TF32X3)
               for t in decodes)
    assert out.dtype == dt
    assert _rel(out, ref) < (2e-2 if dt == mx.bfloat16 else 1e-5)


@pytest.mark.parametrize("B,H,T,appends,bits,splits",
                         _params_of(MT.test_kernel_mla_decode_matches_reference, "B,H,T,appends,bits,splits"))
@pytest.mark.parametrize("bk", ["32", "64"])
@pytest.mark.parametrize("dt", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_cuda_mla_decode_bulk(cuda_emu, monkeypatch, B, H, T, appends, bits, splits, bk, dt):
    """KIMI_MLX_MLA_DECODE_BULK=1: key tiles by bulk copies counted on an mbarrier (8-bit segments
    keep the synchronous loads)."""
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_BULK", "1")
    monkeypatch.delenv("KIMI_MLX_MLA_DECODE_GROUPS", raising=False)
    out, ref = MT.decode_case(monkeypatch, B, H, T, appends, bits, splits, "2", bk, dt)
    decodes = [t for k, t in cuda_emu if k == "mla_decode"]
    assert decodes and all(t["BULK"] == (not t["Q8"]) for t in decodes)
    assert _rel(out, ref) < (2e-2 if dt == mx.bfloat16 else 1e-5)


@pytest.mark.parametrize("splits,cuts", [(1, ()), (5, ()), (5, (3,)), (6, (1, 4))])
def test_cuda_mla_combine(cuda_emu, splits, cuts):
    """Partials of several splits (one of them empty: lse -inf) merged, against numpy; cuts: the
    splits come as several segments' partials (the last one read in place, the rest joined)."""
    rng = np.random.default_rng(splits + len(cuts))
    B, M = 2, 3
    o = rng.standard_normal((B, splits, M, DV)).astype(np.float32)
    lse = rng.standard_normal((B, splits, M)).astype(np.float32) * 3
    if splits > 1:
        lse[0, 1, :] = -np.inf
    edges = [0, *cuts, splits]
    parts = [(mx.array(o[:, a:b]), mx.array(lse[:, a:b])) for a, b in zip(edges, edges[1:])]
    out = K.mla_combine(parts, mx.bfloat16)
    w = np.exp(lse - lse.max(1, keepdims=True))
    ref = (w[..., None] * o).sum(1) / w.sum(1)[..., None]
    assert [k for k, _ in cuda_emu] == ["mla_combine"] and out.dtype == mx.bfloat16
    assert [t["TWO"] for k, t in cuda_emu] == [bool(cuts)]
    assert np.abs(np.array(out.astype(mx.float32)) - ref).max() < 1e-2 * np.abs(ref).max()


@pytest.mark.parametrize("B,H,T,before,bits,block_keys",
                         _params_of(MT.test_kernel_mla_prefill_matches_reference, "B,H,T,before,bits,block_keys"))
# nw 8 is the CUDA default (bf16 with rw 1 keeps the query fragments in registers, QREG);
# rw 2 with 2 warps, so that a 70-query chunk spans two blocks of 64
@pytest.mark.parametrize("nbuf,rw,nw", [("1", "1", "8"), ("2", "1", "8"), ("2", "2", "2")])
@pytest.mark.parametrize("dt", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
def test_cuda_mla_prefill(cuda_emu, monkeypatch, B, H, T, before, bits, block_keys, nbuf, rw, nw, dt):
    monkeypatch.setenv("KIMI_MLX_MLA_NBUF", nbuf)
    monkeypatch.setenv("KIMI_MLX_MLA_PREFILL_RW", rw)
    monkeypatch.setenv("KIMI_MLX_MLA_PREFILL_NW", nw)
    out, ref = MT.prefill_case(monkeypatch, B, H, T, before, bits, block_keys, dt)
    prefills = [t for k, t in cuda_emu if k == "mla_prefill"]
    assert prefills and all(p["NBUF"] == int(nbuf) and p["RW"] == int(rw) and p["NW"] == int(nw) for p in prefills)
    assert all(p["QREG"] == (dt == mx.bfloat16 and rw == "1") for p in prefills)
    if block_keys:
        assert len(prefills) > 1 and prefills[-1]["HAS_INIT"]
    assert out.dtype == dt
    assert _rel(out, ref) < (2e-2 if dt == mx.bfloat16 else 1e-5)


def test_cuda_mla_defaults(cuda_emu, monkeypatch):
    """No settings: the CUDA defaults (decode: 2 key buffers of 64 keys; prefill: rw 2, 2 buffers)."""
    for var in ("KIMI_MLX_MLA_NBUF", "KIMI_MLX_MLA_DECODE_BK", "KIMI_MLX_MLA_PREFILL_RW", "KIMI_MLX_MLA_TGS",
                "KIMI_MLX_MLA_PREFILL_NW", "KIMI_MLX_MLA_DECODE_GROUPS", "KIMI_MLX_MLA_DECODE_NW"):
        monkeypatch.delenv(var, raising=False)
    out, ref = MT.prefill_case(monkeypatch, 1, 2, 37, [20], None, None, mx.bfloat16)
    assert _rel(out, ref) < 2e-2
    rng = np.random.default_rng(2)
    rows = mx.array(rng.standard_normal((1, 300, D)).astype(np.float32)).astype(mx.bfloat16)
    c = MT._cache(rows, [300])
    q = mx.array(rng.standard_normal((1, 4, 1, D)).astype(np.float32)).astype(mx.bfloat16)
    assert _rel(A.mla_decode_attention(q, c, 0.3, DL), MT._ref_decode(q, c, 0.3, 299)) < 2e-2
    p = next(t for k, t in cuda_emu if k == "mla_prefill")
    d = next(t for k, t in cuda_emu if k == "mla_decode")
    assert (p["RW"], p["NBUF"], p["NW"], p["QREG"]) == (2, 2, 8, False)
    assert (d["NBUF"], d["BK"], d["G"]) == (2, 64, 1)


# ---------------------------------------------------------------------------------------------
# KDA (launch code in metal_kernels/__init__.py)

KK, KV = 32, 32  # head dims (small)


def _kda_inputs(rng, B, L, H):
    return dict(q_raw=rng.standard_normal((B, L, H, KK)), k_raw=rng.standard_normal((B, L, H, KK)),
                v=rng.standard_normal((B, L, H, KV)), f=rng.standard_normal((B, L, H, KK)),
                b_raw=rng.standard_normal((B, L, H)), dt_bias=0.5 * rng.standard_normal(H * KK),
                A_log=np.log(rng.uniform(1, 16, H)))


@pytest.mark.parametrize("L,B,init", [(1, 1, True), (63, 1, False), (65, 2, True), (150, 1, True)])
# split: the v-slice blocks of a head share the intra-chunk work (the CUDA default); nt 128: four
# warps (bf16; fp32 always takes 256); prec 2,2: single tf32 products
@pytest.mark.parametrize("dt,split,nt,prec", [
    ("float32", "1", None, None), ("float32", "0", None, None), ("float32", "0", None, "2,2"),
    ("bfloat16", "1", None, None), ("bfloat16", "0", None, None), ("bfloat16", "1", "128", None),
])
def test_cuda_kda_prefill(cuda_emu, monkeypatch, L, B, init, dt, split, nt, prec):
    monkeypatch.setenv("KIMI_MLX_KDA_SPLIT", split)
    if nt:
        monkeypatch.setenv("KIMI_MLX_KDA_NT", nt)
    if prec:
        monkeypatch.setenv("KIMI_MLX_KDA_PREC", prec)
    rng = np.random.default_rng(L * 10 + B)
    H = 2
    ins = {n: a.astype(np.float32) for n, a in _kda_inputs(rng, B, L, H).items()}
    S0 = rng.standard_normal((B, H, KK, KV)).astype(np.float32) if init else None
    mt = getattr(mx, dt)
    o, S = metal_kernels.kda_prefill_fused(*(mx.array(ins[n]).astype(mt) for n in ("q_raw", "k_raw", "v", "f")),
                                           mx.array(ins["dt_bias"]), mx.array(ins["A_log"]),
                                           mx.array(ins["b_raw"]).astype(mt),
                                           mx.array(S0) if init else None)
    (kind, t), = cuda_emu
    # (fp32 takes 256 threads on CUDA whatever the setting: registers)
    assert kind == "prefill" and t["SPLIT"] == (split == "1") and t["NT"] == (int(nt or 256) if dt == "bfloat16" else 256)
    assert (t["PI"], t["PS"]) == ((2, 2) if prec else (0, 0) if dt == "bfloat16" else (1, 1))
    r = {n: round_to(ins[n], dt) for n in ("q_raw", "k_raw", "v", "f", "b_raw")}
    q, k, g, beta = gates_np(r["q_raw"], r["k_raw"], r["f"], ins["dt_bias"], ins["A_log"], r["b_raw"])
    o_ref, S_ref = kda_np(q, k, r["v"], g, beta, S0)
    o, S = np.array(o.astype(mx.float32)), np.array(S)
    assert np.isfinite(o).all() and np.isfinite(S).all()
    tol = 2e-2 if dt == "bfloat16" else (5e-3 if prec else 1e-5)
    assert rel_err(o, o_ref) < tol and rel_err(S, S_ref) < tol


@pytest.mark.parametrize("gated,dt,conv,low", [(False, "float32", False, False), (True, "float32", False, False),
                                               (True, "bfloat16", False, False), (True, "bfloat16", True, False),
                                               (False, "float32", True, False), (True, "bfloat16", True, True),
                                               (True, "float32", False, True)])
def test_cuda_kda_decode(cuda_emu, gated, dt, conv, low):
    """conv: the launch code's fused short convs (x before them [B, 1, C], the conv state in and out);
    low: the second low-rank projections of f and the gate in the kernel too (f_a, g_a [B, 1, K])."""
    rng = np.random.default_rng(3)
    B, H = 2, 3
    ins = {n: a[:, 0].astype(np.float32) for n, a in _kda_inputs(rng, B, 1, H).items()
           if n not in ("dt_bias", "A_log")}
    dt_bias = (0.5 * rng.standard_normal(H * KK)).astype(np.float32)
    A_log = np.log(rng.uniform(1, 16, H)).astype(np.float32)
    norm_w = rng.uniform(0.5, 1.5, KV).astype(np.float32)
    gate = rng.standard_normal((B, H, KV)).astype(np.float32)
    S0 = rng.standard_normal((B, H, KK, KV)).astype(np.float32)
    mt = getattr(mx, dt)
    r = {n: round_to(ins[n], dt) for n in ("q_raw", "k_raw", "v", "f", "b_raw")}
    raw = [mx.array(ins[n]).astype(mt) for n in ("q_raw", "k_raw", "v")]
    kw = {}
    if conv:
        (x, cs, w), conv_raw, cs_ref = conv_decode_case(rng, B, H, KK, KV, dt)
        r.update(conv_raw)
        raw = [mx.array(x[:, None]).astype(mt), None, None]
        kw["conv"] = (mx.array(cs).astype(mt), mx.array(w).astype(mt))
    f_in, gate_in = mx.array(ins["f"]).astype(mt), mx.array(gate).astype(mt) if gated else None
    rg = {"gate": round_to(gate, dt)}
    if low:
        (f_a, g_a, f_w, g_w), low_raw = low_rank_decode_case(rng, B, H, KK, KV, dt)
        r["f"], rg["gate"] = low_raw["f"], low_raw["gate"]
        f_in, gate_in = mx.array(f_a[:, None]).astype(mt), mx.array(g_a[:, None]).astype(mt)
        kw["low_rank"] = (mx.array(f_w).astype(mt), mx.array(g_w).astype(mt))
    out = metal_kernels.kda_decode_step_fused(
        *raw, f_in, mx.array(dt_bias),
        mx.array(A_log), mx.array(ins["b_raw"]).astype(mt), mx.array(S0),
        o_norm_weight=mx.array(norm_w).astype(mt) if gated else None, gate=gate_in, **kw)
    assert [k for k, _ in cuda_emu] == ["decode"] and cuda_emu[0][1]["KC"] == (4 if conv else 0)
    assert cuda_emu[0][1]["LR"] is low
    o, S = out[:2]
    q, k, g, beta = gates_np(r["q_raw"][:, None], r["k_raw"][:, None], r["f"][:, None], dt_bias, A_log,
                             r["b_raw"][:, None])
    o_ref, S_ref = kda_np(q, k, r["v"][:, None], g, beta, S0)
    o_ref = o_ref[:, 0]
    if gated:
        o_ref = (o_ref / np.sqrt((o_ref ** 2).mean(-1, keepdims=True) + 1e-5) * round_to(norm_w, dt)
                 / (1 + np.exp(-rg["gate"])))
    tol = 2e-2 if dt == "bfloat16" else 1e-5
    assert o.shape == (B, H, KV)
    assert rel_err(np.array(o.astype(mx.float32)), o_ref) < tol
    assert rel_err(np.array(S), S_ref) < (1e-2 if (conv or low) and dt == "bfloat16" else 1e-5)
    if conv:
        assert np.array_equal(np.array(out[2].astype(mx.float32)), cs_ref)


def test_cuda_model_matches_oracle(cuda_emu, monkeypatch):
    """tiny_quant through the CUDA launch code and text: 65 tokens of prefill (KDA chunk scan with
    SPLIT, MLA expanded prefill), two decode steps, against the transformers oracle's logits."""
    monkeypatch.setattr("kimi_mlx.ops.attention._kernels_trusted", lambda kind, key: True)
    prefill, decode = tiny_quant_through_kernels(cuda_emu, lambda: monkeypatch.setattr(mx.cuda, "is_available",
                                                                                        lambda: False))
    assert sorted({k for k, _ in prefill}) == ["mla_prefill", "prefill"]
    assert all(t["SPLIT"] for k, t in prefill if k == "prefill")
    assert sorted({k for k, _ in decode}) == ["decode", "mla_combine", "mla_decode"]


# ---------------------------------------------------------------------------------------------
# The fragment helpers of the CUDA header against numpy, one warp. A (16x16) and B, B2 (16x16)
# in shared memory (transposed as TA / TB); out1 = A B through frag_load_b2, out2 = A B through
# frag_load_b, out3 = (A B) B2 with the A operand taken from the accumulators (frag_a_from_c).

FRAG_BODY = CUDA.prologue + CUDA.smem + r"""
  constexpr int LD = 24;  // 16 + 8 elements: rows 16-byte aligned in both tile types
  constexpr int TF = (16 * LD * (int)sizeof(ST) + 3) / 4;
  ST* sa = TILE_PTR(ST, smem, 0);
  ST* sb = TILE_PTR(ST, smem, TF);
  ST* sb2 = TILE_PTR(ST, smem, 2 * TF);
  for (int i = _tid; i < 256; i += 32) {
    const int r = i / 16, c = i % 16;
    sa[(TA ? c : r) * LD + (TA ? r : c)] = static_cast<ST>(a[i]);
    sb[(TB ? c : r) * LD + (TB ? r : c)] = static_cast<ST>(b[i]);
    sb2[r * LD + c] = static_cast<ST>(b2[i]);
  }
  __syncthreads();
  FragC c[2], e[2], d[2];
  for (int j = 0; j < 2; ++j) { frag_zero(c[j]); frag_zero(e[j]); frag_zero(d[j]); }
  for (int k0 = 0; k0 < 16; k0 += KSTEP(PR)) {
    FragA<PR> fa;
    FragB<PR> b0, b1;
    frag_load_a<TA>(fa, sa, LD, 0, k0);
    frag_load_b2<TB>(b0, b1, sb, LD, k0, 0);
    frag_mma(c[0], fa, b0);
    frag_mma(c[1], fa, b1);
    for (int j = 0; j < 2; ++j) {
      FragB<PR> bj;
      frag_load_b<TB>(bj, sb, LD, k0, 8 * j);
      frag_mma(e[j], fa, bj);
    }
  }
  for (int j = 0; j < 2; ++j) {
    frag_store_c(c[j], out1, 16, 0, 8 * j);
    frag_store_c(e[j], out2, 16, 0, 8 * j);
  }
  for (int k0 = 0; k0 < 16; k0 += KSTEP(PR)) {
    FragA<PR> pa;
    frag_a_from_c(pa, c + k0 / 8);
    FragB<PR> b0, b1;
    frag_load_b2<false>(b0, b1, sb2, LD, k0, 0);
    frag_mma(d[0], pa, b0);
    frag_mma(d[1], pa, b1);
  }
  for (int j = 0; j < 2; ++j) frag_store_c(d[j], out3, 16, 0, 8 * j);
"""


def _tf32(x):
    """cvt.rna.tf32.f32: nearest, ties away from zero, to 10 mantissa bits."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)


def _operand(x, pr):
    """What a product of precision pr multiplies, as one float64 array (3xtf32: hi + lo)."""
    x = np.asarray(x, np.float32)
    if pr == PREC_BF16:
        return round_to(x, "bfloat16").astype(np.float64)
    hi = _tf32(x)
    return hi.astype(np.float64) + (_tf32(x - hi) if pr == PREC_TF32X3 else 0.0)


def _frag_run(st, pr, ta, tb, header=None, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    a, b, b2 = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(3))
    tmpl = [("ST", st), ("PR", pr), ("TA", ta), ("TB", tb)]
    res = run_cuda_body("frag", header or CUDA.header, FRAG_BODY, tmpl, dict(a=a, b=b, b2=b2),
                        dict(a="float32", b="float32", b2="float32"),
                        dict(out1=(16, 16), out2=(16, 16), out3=(16, 16)),
                        dict(out1="float32", out2="float32", out3="float32"), (1, 1, 1), 32, 3 * 16 * 24 * 4)
    a, b, b2 = (round_to(x, st) for x in (a, b, b2))  # what the tiles hold
    ab = _operand(a, pr) @ _operand(b, pr)
    return res, ab, _operand(ab.astype(np.float32), pr) @ _operand(b2, pr)


@pytest.mark.parametrize("st,pr", [("bfloat16", PREC_BF16), ("float32", PREC_BF16), ("float32", PREC_TF32X3),
                                   ("float32", PREC_TF32)])
@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
def test_cuda_fragments_match_numpy(st, pr, ta, tb):
    """Every lane's operands as the products of precision pr use them (bf16 tiles: ldmatrix
    and its .trans forms), accumulated exactly enough to agree to fp32 rounding."""
    res, ab, abb = _frag_run(st, pr, ta, tb)
    for out, ref in ((res["out1"], ab), (res["out2"], ab), (res["out3"], abb)):
        assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


def test_cuda_tf32_products_lose_precision():
    """tf32 rounding is emulated: one tf32 product is ~1e-3 off the fp32 product, 3xtf32 is not."""
    errs = {}
    for pr in (PREC_TF32, PREC_TF32X3):
        res, _, _ = _frag_run("float32", pr, False, False)
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((16, 16)) for _ in range(2))
        exact = a.astype(np.float32).astype(np.float64) @ b.astype(np.float32).astype(np.float64)
        errs[pr] = np.abs(res["out1"] - exact).max() / np.abs(exact).max()
    assert 1e-4 < errs[PREC_TF32] < 1e-2 and errs[PREC_TF32X3] < 1e-6


# ---------------------------------------------------------------------------------------------
# Sabotage: the emulator is not vacuous.

def _sabotaged(old, new):
    text = CUDA.header
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("old,new", [
    # the two B fragments of one ldmatrix.x4 swapped
    ("b0.x[0] = r[0]; b0.x[1] = r[1]; b1.x[0] = r[2]; b1.x[1] = r[3];",
     "b0.x[0] = r[2]; b0.x[1] = r[3]; b1.x[0] = r[0]; b1.x[1] = r[1];"),
    # the A matrices of ldmatrix.x4 named in the wrong order (k halves for row halves)
    ("kda_ldsm4(a.x, p + (long)(m0 + i + 8 * (j & 1)) * ld + k0 + 8 * (j >> 1));",
     "kda_ldsm4(a.x, p + (long)(m0 + i + 8 * (j >> 1)) * ld + k0 + 8 * (j & 1));"),
    # .trans dropped from the B load of row-major (k, n) tiles
    ("else kda_ldsm4t(r, p + (long)(k0 + i + 8 * (j & 1)) * ld + n0 + 8 * (j >> 1));",
     "else kda_ldsm4(r, p + (long)(k0 + i + 8 * (j & 1)) * ld + n0 + 8 * (j >> 1));"),
])
def test_cuda_wrong_fragment_layout_fails(old, new):
    res, ab, _ = _frag_run("bfloat16", PREC_BF16, False, False, header=_sabotaged(old, new))
    assert np.abs(res["out1"] - ab).max() > 1e-2 * np.abs(ab).max()


def test_cuda_missing_async_wait_fails(cuda_emu, monkeypatch):
    """cp.async lands only at its wait (until then the tile reads NaN): a decode whose waits are
    gone goes wrong (the NaN scores end up as zero weights in the combine)."""
    render = sources.render

    def broken(d, kind, prof=False):
        h, b = render(d, kind, prof)
        if d is CUDA:
            h = re.sub(r"#define ASYNC_WAIT([01])\(\) kda_cuda::cp_async_wait\(\1\)",
                       r"#define ASYNC_WAIT\1() do { } while (0)", h)
            assert "kda_cuda::cp_async_wait" not in h
        return h, b

    monkeypatch.setattr(sources, "render", broken)
    monkeypatch.setenv("KIMI_MLX_MLA_NBUF", "2")
    rng = np.random.default_rng(1)
    rows = mx.array(rng.standard_normal((1, 100, D)).astype(np.float32)).astype(mx.bfloat16)
    c = MT._cache(rows, [100])
    q = mx.array(rng.standard_normal((1, 4, 1, D)).astype(np.float32)).astype(mx.bfloat16)
    out = A.mla_decode_attention(q, c, 0.3, DL)
    assert not _rel(out, MT._ref_decode(q, c, 0.3, 99)) < 0.5


def _tiny(body, nt=64, smem=64, header=None):
    """Run a small kernel body (one block) that writes out[nt]; returns it."""
    res = run_cuda_body("tiny", header or CUDA.header, CUDA.prologue + CUDA.smem + body, [],
                        dict(x=np.arange(nt, dtype=np.float32)), dict(x="float32"), dict(out=(nt,)),
                        dict(out="float32"), (1, 1, 1), nt, smem)
    return res["out"]


def test_cuda_emulator_collectives():
    """Shuffles, votes, named barriers and shared arrays on a small kernel."""
    out = _tiny(r"""
  SHARED_ARR(float, part, 2);
  float v = x[_tid];
  const float s = WARP_SUM(v);
  const float o = __shfl_sync(0xffffffffu, v, 31 - _lane);
  const bool all = WARP_ALL(v >= 0.0f), some = WARP_ALL(v > 31.0f);
  if (_lane == 0) part[_warp] = s;
  GROUP_BARRIER(1 + (_warp & 1), 32);  // a barrier of one warp: the other's part may be unset
  const float mine = part[_warp];
  __syncthreads();
  out[_tid] = mine + part[1 - _warp] * 1000.0f + o * 1e6f + (all ? 0.5f : 0.0f) + (some ? 0.25f : 0.0f);
""")
    lane = np.arange(64) % 32
    warp = np.arange(64) // 32
    sums = np.array([sum(range(32)), sum(range(32, 64))], np.float64)
    expect = sums[warp] + sums[1 - warp] * 1000 + (warp * 32 + 31 - lane) * 1e6 + 0.5 + 0.25 * warp
    assert np.allclose(out, expect, rtol=1e-6)


@pytest.mark.parametrize("body,message", [
    # a __syncthreads that thread 0 never reaches: reported, not a hang
    ("if (_tid > 0) __syncthreads(); out[_tid] = 0.0f;", "made no progress"),
    # lanes of one warp in two different collectives
    ("float v = _lane < 16 ? SHFL_XOR(1.0f, 1) : (float)WARP_ALL(true); out[_tid] = v;", "divergent warp"),
    # one barrier id with two counts
    ("GROUP_BARRIER(1, 64); if (_warp == 0) GROUP_BARRIER(1, 32); out[_tid] = 0.0f;", "was used with 64 threads"),
    # a write past the launch's dynamic shared memory (64 bytes)
    ("smem[16 + _tid] = 1.0f; out[_tid] = 0.0f;", "past the 64 bytes"),
    # a 16-byte load from an address that is not 16-byte aligned
    ("Raw8<__nv_bfloat16> r; ld8(r, reinterpret_cast<const __nv_bfloat16*>(x) + 1); out[_tid] = get8(r, 0);",
     "misaligned address"),
    # ldmatrix rows must be 16-byte aligned shared memory
    ("unsigned int r[4]; kda_ldsm4(r, reinterpret_cast<const __nv_bfloat16*>(smem) + (_lane & 7) * 4 + 1);"
     " out[_tid] = (float)r[0];", "not 16-byte aligned"),
])
def test_cuda_emulator_reports_kernel_bugs(monkeypatch, body, message):
    monkeypatch.setenv("KDA_EMU_TIMEOUT", "3")
    with pytest.raises(RuntimeError, match=message):
        _tiny(body)
