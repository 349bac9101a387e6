"""The Metal KDA kernels executed on the CPU (metal_stub.h emulation) against a float64 numpy
reference. Small head dims keep it quick; the algorithm and the Metal text are the ones a Mac
runs (the CUDA twin shares them and is checked on a GPU by scripts/kda_device_check.py)."""
import numpy as np
import pytest

from metal_kernels.emulate import (conv_decode_case, cxx, gates_np, kda_np, low_rank_decode_case, rel_err,
                                   round_to, run_metal)
from metal_kernels.kda_template import prefill_smem_floats, split_item_sizes

pytestmark = pytest.mark.skipif(cxx() is None, reason="no C++ compiler")

K, V, BV, NT = 32, 32, 16, 128
RAW = ["q_raw", "k_raw", "v", "f", "b_raw"]


def _inputs(rng, B, L, H, strong_decay=False):
    d = dict(
        q_raw=rng.standard_normal((B, L, H, K)),
        k_raw=rng.standard_normal((B, L, H, K)),
        v=rng.standard_normal((B, L, H, V)),
        f=rng.standard_normal((B, L, H, K)) * (3.0 if strong_decay else 1.0),
        b_raw=rng.standard_normal((B, L, H)),
        dt_bias=0.5 * rng.standard_normal(H * K) + (4.0 if strong_decay else 0.0),
        A_log=np.log(rng.uniform(1, 16, H)),
    )
    return {n: a.astype(np.float32) for n, a in d.items()}


def _prefill(ins, S0, dt, split=False):
    """split: the V/BV threadgroups of a head share the intra-chunk work (SPLIT); the emulator
    runs threadgroups one after another, so the first of each head claims and runs every item
    and the others read them back."""
    B, L, H, _ = ins["q_raw"].shape
    nch = -(-L // 64)
    ind = {n: dt for n in RAW}
    ind.update(dt_bias="float32", A_log="float32", init_state="float32", sync="int32")
    outd = dict(o=dt, state_out="float32", xs="float32", xf="float32", scratch="float32")
    smem = prefill_smem_floats(K, BV)
    ntg = (V // BV) * H * B
    tmpl = [("T", dt), ("K", K), ("V", V), ("BV", BV), ("NT", NT), ("HAS_INIT", S0 is not None),
            ("PI", 0), ("PS", 0), ("PF", L > 64 and not split), ("SPLIT", split), ("TS", "float32"), ("LA", 3),
            ("SMEM_FLOATS", smem)]
    xs_item, xf_item = split_item_sizes(K)
    # sync slots start at the value in the last slot (here 77; the dispatch picks one per call)
    sync = np.full(B * H * (nch + 1) + 1, 77, np.int32) if split else np.zeros(1, np.int32)
    args = dict(ins, init_state=S0 if S0 is not None else np.zeros(1, np.float32), sync=sync)
    outs = dict(o=(B, L, H, V), state_out=(B, H, K, V),
                xs=(B * H * nch * xs_item,) if split else (1,),
                xf=(B * H * nch * xf_item,) if split else (1,), scratch=(ntg * smem,))
    out = run_metal("prefill", tmpl, args, ind, outs, outd, (V // BV, H, B), NT)
    if split:  # every item was published (xs also carries M's unused upper blocks, unwritten)
        assert not np.isnan(out["xf"]).any()
    return out["o"], out["state_out"]


def _reference(ins, S0, dt):
    r = {n: round_to(ins[n], dt) for n in RAW}
    q, k, g, beta = gates_np(r["q_raw"], r["k_raw"], r["f"], ins["dt_bias"], ins["A_log"], r["b_raw"])
    return kda_np(q, k, r["v"], g, beta, S0)


@pytest.mark.parametrize("L,B,init,dt,split", [
    (1, 1, False, "float32", False),
    (63, 1, True, "float32", False),
    (64, 2, False, "float32", False),
    (65, 1, True, "float32", False),
    (150, 2, True, "bfloat16", False),
    (1, 1, True, "float32", True),
    (65, 1, False, "float32", True),
    (150, 2, True, "float32", True),
    (200, 1, True, "bfloat16", True),
])
def test_kernel_prefill_emulated(L, B, init, dt, split):
    rng = np.random.default_rng(L * 10 + B)
    ins = _inputs(rng, B, L, 2)
    S0 = rng.standard_normal((B, 2, K, V)).astype(np.float32) if init else None
    o, S = _prefill(ins, S0, dt, split)
    assert not np.isnan(o).any() and not np.isnan(S).any()  # every element written
    o_ref, S_ref = _reference(ins, S0, dt)
    tol = 1e-5 if dt == "float32" else 1e-2
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, S_ref) < 1e-5


@pytest.mark.parametrize("split", [False, True])
def test_kernel_prefill_emulated_strong_decay(split):
    # per-step log decay down to ~ -100: exp of G differences across a chunk would overflow;
    # the sub-block references keep every exponent <= 0
    rng = np.random.default_rng(7)
    ins = _inputs(rng, 1, 130, 2, strong_decay=True)
    S0 = rng.standard_normal((1, 2, K, V)).astype(np.float32)
    o, S = _prefill(ins, S0, "float32", split)
    o_ref, S_ref = _reference(ins, S0, "float32")
    assert np.isfinite(o).all() and np.isfinite(S).all()
    assert rel_err(o, o_ref) < 1e-5 and rel_err(S, S_ref) < 1e-5


def _decode(ins, S0, dt, gated, conv=None, low=None):
    """conv: (x [B, C] before the short convs, conv_state [B, KC-1, C], w [C, KC]): the kernel runs
    the convs (q_raw, k_raw and v of ins are not passed). low: (f_a, g_a [B, K], f_w [H*K, K],
    g_w [H*V, K]): the kernel runs the second projections of f and the gate (f and gate of ins are
    not passed). Returns (o, state, conv_out or None)."""
    B, H = ins["b_raw"].shape[:2]
    names = ["q_raw", "k_raw", "v", "f", "b_raw", "norm_w", "gate", "conv_state", "conv_w", "f_w", "g_w"]
    ind = {n: dt for n in names}
    ind.update(dt_bias="float32", A_log="float32", state="float32", eps="float32")
    bvd, rg = (V, 4) if gated else (32, 2)
    kc = conv[2].shape[1] if conv is not None else 0
    one = np.zeros((1,), np.float32)
    extra = dict(conv_state=one, conv_w=one, f_w=one, g_w=one)
    if conv is not None:
        extra.update(q_raw=conv[0], k_raw=one, v=one, conv_state=conv[1], conv_w=conv[2])
    if low is not None:
        extra.update(f=low[0], gate=low[1], f_w=low[2], g_w=low[3])
    tmpl = [("T", dt), ("K", K), ("V", V), ("BVD", bvd), ("NTD", bvd * rg), ("GATED", gated), ("KC", kc),
            ("LR", low is not None)]
    out = run_metal("decode", tmpl, dict(ins, state=S0, eps=np.array([1e-5], np.float32), **extra), ind,
                    dict(o=(B, H, V), state_out=(B, H, K, V), conv_out=conv[1].shape if kc else (1,)),
                    dict(o=dt, state_out="float32", conv_out=dt), (V // bvd, H, B), bvd * rg)
    return out["o"], out["state_out"], out["conv_out"] if kc else None


@pytest.mark.parametrize("gated,dt,conv,low", [(False, "float32", False, False), (True, "float32", False, False),
                                               (False, "bfloat16", False, False), (True, "bfloat16", True, False),
                                               (False, "float32", True, False), (True, "float32", True, True),
                                               (True, "bfloat16", False, True)])
def test_kernel_decode_emulated(gated, dt, conv, low):
    """conv: the short convs run in the kernel (x before them, the conv state in and out); low:
    the second low-rank projections of f and the gate too."""
    rng = np.random.default_rng(3)
    B, H = 2, 3
    ins = {n: a[:, 0] for n, a in _inputs(rng, B, 1, H).items() if n in RAW}
    ins.update(dt_bias=(0.5 * rng.standard_normal(H * K)).astype(np.float32),
               A_log=np.log(rng.uniform(1, 16, H)).astype(np.float32),
               norm_w=rng.uniform(0.5, 1.5, V).astype(np.float32),
               gate=rng.standard_normal((B, H, V)).astype(np.float32))
    S0 = rng.standard_normal((B, H, K, V)).astype(np.float32)
    r = {n: round_to(ins[n], dt) for n in ["q_raw", "k_raw", "v", "f", "b_raw", "norm_w", "gate"]}
    args = lows = None
    if conv:
        args, raw, cs_ref = conv_decode_case(rng, B, H, K, V, dt)
        r.update(raw)
    if low:
        lows, raw = low_rank_decode_case(rng, B, H, K, V, dt)
        r.update(raw)
    o, S, cs = _decode(ins, S0, dt, gated, args, lows)
    q, k, g, beta = gates_np(r["q_raw"][:, None], r["k_raw"][:, None], r["f"][:, None],
                             ins["dt_bias"], ins["A_log"], r["b_raw"][:, None])
    o_ref, S_ref = kda_np(q, k, r["v"][:, None], g, beta, S0)
    o_ref = o_ref[:, 0]
    if gated:
        o_ref = (o_ref / np.sqrt((o_ref ** 2).mean(-1, keepdims=True) + 1e-5) * r["norm_w"]
                 / (1 + np.exp(-r["gate"])))
    tol = 1e-5 if dt == "float32" else 1e-2
    assert rel_err(o, o_ref) < tol
    assert rel_err(S, S_ref) < (1e-5 if dt == "float32" or not (conv or low) else 1e-2)
    if conv:
        assert np.array_equal(cs, cs_ref)  # the shifted inputs, exactly
