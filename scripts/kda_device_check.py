#!/usr/bin/env python3
"""Check and time the CUDA twin of the KDA kernels on an NVIDIA GPU, in one run.

  python3 scripts/kda_device_check.py            # everything; report files under $OUT (or ./out)
  python3 scripts/kda_device_check.py --dry-run  # CPU plumbing test: tiny sizes, MLX-ops path

Correctness: lengths 1, 63, 64, 65, 1000, 4096, 16384 x batch 1, 3 x zero / random initial
state x bf16 / fp32 inputs (H=4, K=V=128), against FLA's naive_recurrent_kda (fp32, torch on
the GPU) and the project's MLX-ops chunked form (kimi_mlx.ops.kda_chunked, on the GPU). Outputs
are NaN-poisoned before each kernel run. Pass: relative error (Frobenius) <= 1e-4 for fp32
inputs, <= 1e-2 for bf16.
Timing (same process): prefill T=16384, H=32, K=V=128, bf16, B=1 against FLA chunk_kda and
mx.fast.gated_delta_update; decode B=1 against FLA fused_recurrent_kda.

Writes kda_device_report.md, kda_device_results.json and kda_device_log.txt.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

OUT = Path(os.environ.get("OUT") or ROOT / "out")
OUT.mkdir(parents=True, exist_ok=True)
LOG = open(OUT / "kda_device_log.txt", "a")
RESULTS: dict = {"correctness": [], "decode": [], "bench": {}, "env": {}, "errors": []}


def log(*a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    LOG.write(s + "\n")
    LOG.flush()


def save():
    (OUT / "kda_device_results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

import metal_kernels as mk  # noqa: E402
from kimi_mlx.bench.kda import fla_naive_recurrent_kda, fla_ops  # noqa: E402
from kimi_mlx.ops.kda import kda_gates  # noqa: E402
from kimi_mlx.ops.kda_chunked import kda_chunked  # noqa: E402


# ------------------------------------------------------------------------------------------------
def rel(a, b) -> float:
    a = a.double()
    b = b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mx_of(t: torch.Tensor, dtype):
    return mx.array(t.detach().float().cpu().numpy()).astype(dtype)


def torch_of(a, dev) -> torch.Tensor:
    return torch.from_numpy(np.array(a.astype(mx.float32))).to(dev)


MXDT = {"bf16": mx.bfloat16, "fp32": mx.float32}
TDT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def make_raw(B, L, H, K, V, dev, seed, decay="fla"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    raw = dict(q_raw=r(B, L, H, K), k_raw=r(B, L, H, K), v=r(B, L, H, V), f=r(B, L, H, K),
               b_raw=r(B, L, H))
    if decay == "fla":   # FLA's test ranges: A in [1, 16]
        A_log = torch.empty(H).uniform_(1, 16, generator=g).log()
        dt_bias = r(H * K)
    else:                # long memory: per-step decay ~1e-2
        A_log = torch.empty(H).uniform_(0.01, 0.1, generator=g).log()
        dt_bias = r(H * K) - 2.0
    raw = {k: v.to(dev) for k, v in raw.items()}
    return raw, A_log.to(dev), dt_bias.to(dev)


def gates_torch(q_raw, k_raw, f, b_raw, A_log, dt_bias):
    """q^, k^ (not scaled), g, beta in fp32 from fp64 maths."""
    H, K = q_raw.shape[-2], q_raw.shape[-1]
    q = q_raw.double()
    k = k_raw.double()
    q = q / (q.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    k = k / (k.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    x = f.double() + dt_bias.double().view(H, K)
    gg = -A_log.double().exp().view(H, 1) * torch.nn.functional.softplus(x)
    beta = torch.sigmoid(b_raw.double())
    return q.float(), k.float(), gg.float(), beta.float()


# ------------------------------------------------------------------------------------------------
def ours_prefill(raw_mx, A_log_mx, dtb_mx, S0_mx):
    out = mk.kda_prefill_fused(raw_mx["q_raw"], raw_mx["k_raw"], raw_mx["v"], raw_mx["f"],
                               dtb_mx, A_log_mx, raw_mx["b_raw"], S0_mx)
    if out is None and ARGS.dry_run:  # CPU plumbing run: stand in with the MLX-ops path
        q, k, g, beta = gates_mx(raw_mx, A_log_mx, dtb_mx)
        return kda_chunked(q, k, raw_mx["v"], g, beta, None, S0_mx)
    return out


def gates_mx(raw, A_log, dtb):
    return kda_gates(raw["q_raw"], raw["k_raw"], raw["f"], raw["b_raw"], dtb, A_log)


def correctness(dev, naive_recurrent_kda):
    H, K, V = 4, 128, 128
    lengths = [1, 63, 64, 65, 1000, 4096, 16384] if not ARGS.dry_run else [1, 63, 65, 130]
    if ARGS.lengths:
        lengths = [int(x) for x in ARGS.lengths.split(",")]
    batches = [1, 3]
    extra = [(1000, 1, True, "slow"), (16384, 1, True, "slow")] if not ARGS.dry_run else [(130, 1, True, "slow")]
    cases = [(L, B, init, "fla") for L in lengths for B in batches for init in (False, True)] + extra
    os.environ["KIMI_MLX_KDA_POISON"] = "1"
    for ci, (L, B, init, decay) in enumerate(cases):
        raw, A_log, dtb = make_raw(B, L, H, K, V, dev, seed=1000 + ci, decay=decay)
        S0 = torch.randn(B, H, K, V, device=dev) if init else None
        bv = (16, 32)[ci % 2]       # cover both slice widths and both block sizes
        nt = (256, 512)[(ci // 2) % 2]
        os.environ["KIMI_MLX_KDA_BV"] = str(bv)
        os.environ["KIMI_MLX_KDA_NT"] = str(nt)
        for dname in ("bf16", "fp32"):
            row = dict(L=L, B=B, init=init, dtype=dname, decay=decay, BV=bv,
                       SPLIT=os.environ.get("KIMI_MLX_KDA_SPLIT", "default"),
                       NT=nt if dname == "bf16" else 256)
            try:
                rr = {k: v.to(TDT[dname]).float() for k, v in raw.items()}   # what the kernel sees
                q, k, g, beta = gates_torch(rr["q_raw"], rr["k_raw"], rr["f"], rr["b_raw"], A_log, dtb)
                t0 = time.perf_counter()
                o_ref, S_ref = naive_recurrent_kda(q, k, rr["v"], g, beta, initial_state=S0,
                                                   output_final_state=True)
                row["t_naive_s"] = time.perf_counter() - t0
                raw_mx = {n: mx_of(t, MXDT[dname]) for n, t in rr.items()}
                A_mx, dtb_mx = mx_of(A_log, mx.float32), mx_of(dtb, mx.float32)
                S0_mx = mx_of(S0, mx.float32) if init else None
                o, S = ours_prefill(raw_mx, A_mx, dtb_mx, S0_mx)
                mx.eval(o, S)
                o_t, S_t = torch_of(o, dev), torch_of(S, dev)
                row["nan_o"] = int((~torch.isfinite(o_t)).sum())
                row["nan_S"] = int((~torch.isfinite(S_t)).sum())
                row["err_o_naive"] = rel(o_t, o_ref)
                row["err_S_naive"] = rel(S_t, S_ref)
                # the project's MLX-ops chunked form, on the same device
                qm, km, gm, bm = (mx_of(x, mx.float32) for x in (q, k, g, beta))
                o2, S2 = kda_chunked(qm, km, mx_of(rr["v"], mx.float32), gm, bm, None, S0_mx)
                mx.eval(o2, S2)
                row["err_o_mlxref"] = rel(o_t, torch_of(o2, dev))
                row["err_S_mlxref"] = rel(S_t, torch_of(S2, dev))
                row["err_o_mlxref_vs_naive"] = rel(torch_of(o2, dev), o_ref)
                tol = 1e-4 if dname == "fp32" else 1e-2
                row["pass"] = bool(row["nan_o"] == 0 and row["nan_S"] == 0 and
                                   max(row["err_o_naive"], row["err_S_naive"]) <= tol)
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:2000]
                row["pass"] = False
                log(traceback.format_exc())
            RESULTS["correctness"].append(row)
            log("prefill", {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
            save()
            if "error" in row and ("illegal" in row["error"].lower() or "cuda" in row["error"].lower()):
                log("CUDA error: stopping the correctness sweep")
                os.environ.pop("KIMI_MLX_KDA_POISON", None)
                return False
    os.environ.pop("KIMI_MLX_KDA_POISON", None)
    os.environ.pop("KIMI_MLX_KDA_BV", None)
    os.environ.pop("KIMI_MLX_KDA_NT", None)
    return True


def decode_ref(rr, A_log, dtb, S0, norm_w, gate, naive):
    q, k, g, beta = gates_torch(rr["q_raw"], rr["k_raw"], rr["f"], rr["b_raw"], A_log, dtb)
    o, S = naive(q, k, rr["v"], g, beta, initial_state=S0, output_final_state=True)
    if norm_w is not None:
        o = o.double()
        o = o * (o.square().mean(-1, keepdim=True) + 1e-5).rsqrt() * norm_w.double() * torch.sigmoid(gate.double())
    return o.float(), S


def decode_check(dev, naive):
    H, K, V = 32, 128, 128
    os.environ["KIMI_MLX_KDA_POISON"] = "1"
    for B in (1, 3):
        for dname in ("bf16", "fp32"):
            for gated in (False, True):
                row = dict(B=B, dtype=dname, gated=gated)
                try:
                    raw, A_log, dtb = make_raw(B, 1, H, K, V, dev, seed=77 + B)
                    rr = {k: v.to(TDT[dname]).float() for k, v in raw.items()}
                    S0 = torch.randn(B, H, K, V, device=dev)
                    nw = (torch.rand(V, device=dev) + 0.5).to(TDT[dname]).float() if gated else None
                    gate = torch.randn(B, 1, H, V, device=dev).to(TDT[dname]).float() if gated else None
                    o_ref, S_ref = decode_ref(rr, A_log, dtb, S0, nw, gate, naive)
                    raw_mx = {n: mx_of(t, MXDT[dname]) for n, t in rr.items()}
                    out = mk.kda_decode_step_fused(
                        raw_mx["q_raw"], raw_mx["k_raw"], raw_mx["v"], raw_mx["f"],
                        mx_of(dtb, mx.float32), mx_of(A_log, mx.float32), raw_mx["b_raw"],
                        mx_of(S0, mx.float32),
                        o_norm_weight=mx_of(nw, MXDT[dname]) if gated else None,
                        gate=mx_of(gate, MXDT[dname]) if gated else None)
                    if out is None and ARGS.dry_run:  # CPU plumbing run: MLX-ops stand-in
                        from kimi_mlx.ops.kda_reference import kda_step
                        A_mx, d_mx = mx_of(A_log, mx.float32), mx_of(dtb, mx.float32)
                        qm, km, gm, bm = gates_mx(raw_mx, A_mx, d_mx)
                        o, S = kda_step(qm, km, raw_mx["v"].astype(mx.float32), gm, bm, None, mx_of(S0, mx.float32))
                        if gated:
                            o = mx.fast.rms_norm(o, mx_of(nw, mx.float32), 1e-5) * mx.sigmoid(mx_of(gate, mx.float32))
                        out = (o, S)
                    if out is None:
                        row["skipped"] = "no kernel"
                    else:
                        o, S = out
                        mx.eval(o, S)
                        row["err_o"] = rel(torch_of(o, dev), o_ref)
                        row["err_S"] = rel(torch_of(S, dev), S_ref)
                        tol = 1e-4 if dname == "fp32" else 1e-2
                        row["pass"] = bool(max(row["err_o"], row["err_S"]) <= tol)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:2000]
                    row["pass"] = False
                    log(traceback.format_exc())
                RESULTS["decode"].append(row)
                log("decode", row)
                save()
    os.environ.pop("KIMI_MLX_KDA_POISON", None)


# ------------------------------------------------------------------------------------------------
def t_mlx(fn, reps=10, warm=2):
    for _ in range(warm):
        mx.eval(fn())
    mx.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def t_torch(fn, reps=10, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def bench(dev, fla):
    B, T, H, K, V = (1, 16384, 32, 128, 128) if not ARGS.dry_run else (1, 256, 4, 128, 128)
    res = RESULTS["bench"]
    res["shape"] = dict(B=B, T=T, H=H, K=K, V=V, dtype="bf16")
    raw, A_log, dtb = make_raw(B, T, H, K, V, dev, seed=5)
    rb = {k: v.to(torch.bfloat16) for k, v in raw.items()}
    raw_mx = {n: mx_of(t, mx.bfloat16) for n, t in rb.items()}
    A_mx, dtb_mx = mx_of(A_log, mx.float32), mx_of(dtb, mx.float32)
    mx.eval(raw_mx, A_mx, dtb_mx)

    # ours, a few variants (slice width, precision of the state products)
    variants = [("auto", None, None, None, None, None, None),
                ("BV=32 NT=512 SPLIT=0", "32", None, "512", "0", "0", None),
                ("BV=32 NT=512 SPLIT=1", "32", None, "512", "0", "1", None),
                ("BV=16 NT=512 SPLIT=1", "16", None, "512", "0", "1", None),
                ("BV=32 NT=256 PF=1 SPLIT=0", "32", None, "256", "1", "0", None),
                ("BV=32 NT=512 SPLIT=1 state tf32x3", "32", "0,1", "512", "0", "1", None)]
    if ARGS.variants:  # e.g. "32:512:0:0,32:512:0:1:8": BV:NT:PF[:SPLIT[:LA]]
        variants = [("auto", None, None, None, None, None, None)] + [
            (f"BV={v[0]} NT={v[1]} PF={v[2]}" + (f" SPLIT={v[3]}" if len(v) > 3 else "")
             + (f" LA={v[4]}" if len(v) > 4 else ""),
             v[0], None, v[1], v[2], v[3] if len(v) > 3 else None, v[4] if len(v) > 4 else None)
            for v in (x.split(":") for x in ARGS.variants.split(","))]
    for name, bv, prec, nt, pf, split, la in variants:
        for key, val in (("KIMI_MLX_KDA_BV", bv), ("KIMI_MLX_KDA_PREC", prec), ("KIMI_MLX_KDA_NT", nt),
                         ("KIMI_MLX_KDA_PF", pf), ("KIMI_MLX_KDA_SPLIT", split), ("KIMI_MLX_KDA_LA", la)):
            if val is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = val
        try:
            fn = lambda: ours_prefill(raw_mx, A_mx, dtb_mx, None)  # noqa: E731
            t0 = time.perf_counter()
            mx.eval(fn())
            first = time.perf_counter() - t0
            ms = t_mlx(fn, reps=10 if not ARGS.dry_run else 2)
            res[f"ours {name}"] = dict(ms=ms, first_call_s=first, tok_per_s=B * T / ms * 1e3)
            log(f"prefill ours {name}: {ms:.3f} ms (first call {first:.1f} s)")
        except Exception as e:  # noqa: BLE001
            res[f"ours {name}"] = dict(error=repr(e)[:1500])
            log(traceback.format_exc())
        save()
    os.environ.pop("KIMI_MLX_KDA_BV", None)
    os.environ.pop("KIMI_MLX_KDA_PREC", None)
    os.environ.pop("KIMI_MLX_KDA_NT", None)
    os.environ.pop("KIMI_MLX_KDA_PF", None)
    os.environ.pop("KIMI_MLX_KDA_SPLIT", None)
    os.environ.pop("KIMI_MLX_KDA_LA", None)

    # where the time goes: per-phase clock counts of thread 0, averaged over threadgroups
    if not ARGS.dry_run and not ARGS.no_profile:
        names = ["P1 load+norm+gate", "P2 prefetch, v, cumsum", "P3 diag blocks", "P4 scaled operands",
                 "P5 offdiag mma", "S1 state-pass loads (SPLIT)", "P11 D, E | rescale, Y, O1", "P13-14 M",
                 "S2 Y, O1 (SPLIT)", "P19 U=MY, rescale", "P20 O, S update", "tail store",
                 "P1a o store", "P1b loads, norm, gate, tile stores",   # P1 = P1a + P1b + rest
                 "D claim/wait decision (SPLIT)", "X publish item (SPLIT)"]
        for spec in (ARGS.profiles or "32:512:0:0,32:512:0:1").split(","):
            bv, nt, pf, split = (spec.split(":") + ["0", "1"])[:4]
            os.environ["KIMI_MLX_KDA_BV"] = bv
            os.environ["KIMI_MLX_KDA_NT"] = nt
            os.environ["KIMI_MLX_KDA_PF"] = pf
            os.environ["KIMI_MLX_KDA_SPLIT"] = split
            try:
                o, S, pr = mk._prefill(raw_mx["q_raw"], raw_mx["k_raw"], raw_mx["v"], raw_mx["f"],
                                       dtb_mx, A_mx, raw_mx["b_raw"], None, prof=True)
                mx.eval(o, S, pr)
                p = np.array(pr).mean(0)
                nch = math.ceil(T / 64)
                res[f"profile BV={bv} NT={nt} PF={pf} SPLIT={split}"] = {n: float(p[i] / nch) for i, n in enumerate(names)}
                log(f"profile BV={bv} NT={nt} PF={pf} SPLIT={split} (cycles per chunk, thread 0):",
                    {n: int(p[i] / nch) for i, n in enumerate(names)}, "total", int(p[:16].sum() / nch))
            except Exception as e:  # noqa: BLE001
                res[f"profile BV={bv} NT={nt} PF={pf} SPLIT={split}"] = dict(error=repr(e)[:1500])
                log(traceback.format_exc())
        os.environ.pop("KIMI_MLX_KDA_BV", None)
        os.environ.pop("KIMI_MLX_KDA_NT", None)
        os.environ.pop("KIMI_MLX_KDA_PF", None)
        os.environ.pop("KIMI_MLX_KDA_SPLIT", None)
        save()

    # FLA chunk_kda: fused gate / norm / sigmoid in kernel (like ours), and pre-gated inputs
    if fla is not None:
        chunk_kda, fused_recurrent_kda = fla
        try:
            fn = lambda: chunk_kda(q=rb["q_raw"], k=rb["k_raw"], v=rb["v"], g=rb["f"], beta=rb["b_raw"],  # noqa: E731
                                   A_log=A_log, dt_bias=dtb, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                                   use_beta_sigmoid_in_kernel=True)
            with torch.inference_mode():
                t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = t_torch(fn, reps=20)
            res["fla chunk_kda fused-gate"] = dict(ms=ms, first_call_s=first, tok_per_s=B * T / ms * 1e3)
            log(f"prefill FLA chunk_kda (fused gate): {ms:.3f} ms")
            q, k, g, beta = gates_torch(rb["q_raw"], rb["k_raw"], rb["f"], rb["b_raw"], A_log, dtb)
            qb, kb, gb, bb = q.bfloat16(), k.bfloat16(), g, beta.bfloat16()
            fn2 = lambda: chunk_kda(q=qb, k=kb, v=rb["v"], g=gb, beta=bb, output_final_state=True)  # noqa: E731
            with torch.inference_mode():
                fn2()
                ms2 = t_torch(fn2, reps=20)
            res["fla chunk_kda pre-gated"] = dict(ms=ms2, tok_per_s=B * T / ms2 * 1e3)
            log(f"prefill FLA chunk_kda (pre-gated): {ms2:.3f} ms")
            # agreement of ours and FLA on the benchmark inputs (both bf16)
            with torch.inference_mode():
                o_f, S_f = fn()
            o, S = ours_prefill(raw_mx, A_mx, dtb_mx, None)
            mx.eval(o, S)
            res["ours_vs_fla_bench"] = dict(err_o=rel(torch_of(o, dev), o_f.float()),
                                            err_S=rel(torch_of(S, dev), S_f.float()))
            log("ours vs FLA on bench inputs", res["ours_vs_fla_bench"])
        except Exception as e:  # noqa: BLE001
            res["fla error"] = repr(e)[:1500]
            log(traceback.format_exc())
        save()

    # MLX builtin gated_delta_update (scalar per-head decay; the closest builtin)
    try:
        q, k, g, beta = gates_mx(raw_mx, A_mx, dtb_mx)
        gamma = mx.exp(g.mean(-1)).astype(mx.bfloat16)
        qb, kb, bb = q.astype(mx.bfloat16), k.astype(mx.bfloat16), beta.astype(mx.bfloat16)
        mx.eval(gamma, qb, kb, bb)
        Ts = ([1024, T] if not ARGS.full_builtin_off else [1024]) if not ARGS.dry_run else [64]
        for Tg in Ts:
            fn = lambda: mx.fast.gated_delta_update(qb[:, :Tg], kb[:, :Tg], raw_mx["v"][:, :Tg],  # noqa: E731
                                                     gamma[:, :Tg], bb[:, :Tg])
            t0 = time.perf_counter()
            mx.eval(fn())
            mx.synchronize()
            first = time.perf_counter() - t0
            reps = 3 if first < 5 else 1
            ms = t_mlx(fn, reps=reps, warm=0)
            res[f"mlx gated_delta_update T={Tg}"] = dict(ms=ms, tok_per_s=B * Tg / ms * 1e3)
            log(f"mx.fast.gated_delta_update T={Tg}: {ms:.3f} ms")
            if ms > 2000 and Tg < T:  # too slow to repeat at full length: extrapolate per token instead
                res[f"mlx gated_delta_update T={T} (extrapolated)"] = dict(ms=ms * T / Tg, tok_per_s=B * Tg / ms * 1e3)
                break
    except Exception as e:  # noqa: BLE001
        res["gated_delta_update error"] = repr(e)[:1500]
        log(traceback.format_exc())
    save()

    # decode, batch 1
    Hd = H
    raw1, A1, d1 = make_raw(1, 1, Hd, K, V, dev, seed=9)
    r1 = {k: v.to(torch.bfloat16) for k, v in raw1.items()}
    S1 = torch.randn(1, Hd, K, V, device=dev) * 0.1
    m1 = {n: mx_of(t, mx.bfloat16) for n, t in r1.items()}
    A1m, d1m, S1m = mx_of(A1, mx.float32), mx_of(d1, mx.float32), mx_of(S1, mx.float32)
    nwm = mx.ones((V,), mx.bfloat16)
    gm = mx_of(torch.randn(1, 1, Hd, V), mx.bfloat16)
    mx.eval(m1, A1m, d1m, S1m, nwm, gm)
    N = 64
    # MLX's own per-op cost on this device: a 64-op chain of elementwise ops on a state-sized array
    try:
        def chain0():
            S = S1m
            for _ in range(N):
                S = S * 0.999
            return S
        res["decode mlx elementwise op (baseline)"] = dict(us_per_op_chain=t_mlx(chain0, reps=10) / N * 1e3)
        log("mlx elementwise op in a chain:", res["decode mlx elementwise op (baseline)"])
    except Exception as e:  # noqa: BLE001
        log(repr(e))
    for gated in (False, True):
        try:
            def step(S, gated=gated):
                return mk.kda_decode_step_fused(m1["q_raw"], m1["k_raw"], m1["v"], m1["f"], d1m, A1m,
                                                m1["b_raw"], S, o_norm_weight=nwm if gated else None,
                                                gate=gm if gated else None)
            if step(S1m) is None:
                break
            def chain():
                S = S1m
                os_ = []
                for _ in range(N):
                    o, S = step(S)
                    os_.append(o)
                return os_ + [S]
            ms_chain = t_mlx(chain, reps=10) / N
            ms_single = t_mlx(lambda: step(S1m), reps=50)
            res[f"decode ours gated={gated}"] = dict(us_per_step_chain=ms_chain * 1e3,
                                                     us_per_call_eval=ms_single * 1e3)
            log(f"decode ours gated={gated}: {ms_chain*1e3:.1f} us/step in a {N}-step graph, "
                f"{ms_single*1e3:.1f} us per eval'd call")
        except Exception as e:  # noqa: BLE001
            res[f"decode ours gated={gated}"] = dict(error=repr(e)[:1500])
            log(traceback.format_exc())
        save()
    if fla is not None:
        try:
            S1c = S1.clone()
            fn = lambda: fused_recurrent_kda(q=r1["q_raw"], k=r1["k_raw"], v=r1["v"], g=r1["f"],  # noqa: E731
                                             beta=r1["b_raw"], A_log=A1, dt_bias=d1, initial_state=S1c,
                                             output_final_state=True, use_qk_l2norm_in_kernel=True,
                                             use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)
            with torch.inference_mode():
                fn()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(N * 10):
                    fn()
                torch.cuda.synchronize()
                us_chain = (time.perf_counter() - t0) / (N * 10) * 1e6
                ts = []
                for _ in range(50):
                    t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
                us_single = statistics.median(ts) * 1e6
                import triton
                us_gpu = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            res["decode fla fused_recurrent_kda"] = dict(us_per_step_chain=us_chain,
                                                         us_per_call_sync=us_single, us_gpu_do_bench=us_gpu)
            log(f"decode FLA fused_recurrent_kda: {us_chain:.1f} us/step back-to-back, "
                f"{us_single:.1f} us per synced call, {us_gpu:.1f} us do_bench")
        except Exception as e:  # noqa: BLE001
            res["decode fla error"] = repr(e)[:1500]
            log(traceback.format_exc())
        save()


# ------------------------------------------------------------------------------------------------
def fmt(x, spec=".2e"):
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def report():
    env = RESULTS["env"]
    lines = ["# KDA kernels: device check (CUDA twin)", "",
             f"Card: **{env.get('gpu', '?')}**, driver {env.get('driver', '?')}; mlx {env.get('mlx')}, "
             f"torch {env.get('torch')}, fla-core {env.get('fla')}; run {env.get('date')}.", "",
             "Relative error = ||ours - ref|| / ||ref|| over the whole tensor. Reference: FLA "
             "`naive_recurrent_kda` (fp32) on gates computed in fp64 from the same (rounded) raw "
             "inputs; `mlxref` = `kimi_mlx.ops.kda_chunked` (fp32) on the same GPU. Pass: <= 1e-4 "
             "(fp32 inputs), <= 1e-2 (bf16 inputs), no NaN (outputs poisoned with NaN first).", "",
             "## Prefill correctness (H=4, K=V=128)", "",
             "| L | B | init | dtype | decay | BV, NT | err o (naive) | err S (naive) | err o (mlxref) | err S (mlxref) | pass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in RESULTS["correctness"]:
        lines.append(f"| {r['L']} | {r['B']} | {'rand' if r['init'] else 'zero'} | {r['dtype']} | {r['decay']} | {r.get('BV')}, {r.get('NT')} | "
                     f"{fmt(r.get('err_o_naive'))} | {fmt(r.get('err_S_naive'))} | {fmt(r.get('err_o_mlxref'))} | "
                     f"{fmt(r.get('err_S_mlxref'))} | {'yes' if r.get('pass') else 'NO ' + r.get('error', '')[:80]} |")
    n_ok = sum(1 for r in RESULTS["correctness"] if r.get("pass"))
    lines += ["", f"{n_ok} / {len(RESULTS['correctness'])} prefill cases pass.", "",
              "## Decode correctness (H=32, K=V=128, random state)", "",
              "| B | dtype | gated RMSNorm | err o | err S | pass |", "|---|---|---|---|---|---|"]
    for r in RESULTS["decode"]:
        lines.append(f"| {r['B']} | {r['dtype']} | {r['gated']} | {fmt(r.get('err_o'))} | {fmt(r.get('err_S'))} | "
                     f"{'yes' if r.get('pass') else 'NO ' + r.get('error', r.get('skipped', ''))[:80]} |")
    b = RESULTS["bench"]
    sh = b.get("shape", {})
    lines += ["", f"## Timing (B={sh.get('B')}, T={sh.get('T')}, H={sh.get('H')}, K=V={sh.get('K')}, bf16)", "",
              "| what | ms per layer call | tokens/s |", "|---|---|---|"]
    for k, v in b.items():
        if isinstance(v, dict) and "ms" in v:
            lines.append(f"| {k} | {v['ms']:.3f} | {v['tok_per_s']:.3g} |")
    lines += ["", "| decode (B=1) | us per step |", "|---|---|"]
    for k, v in b.items():
        if k.startswith("decode") and isinstance(v, dict):
            lines.append(f"| {k} | " + ", ".join(f"{kk} {fmt(vv, '.1f')}" for kk, vv in v.items()) + " |")
    if RESULTS["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in RESULTS["errors"]]
    (OUT / "kda_device_report.md").write_text("\n".join(lines) + "\n")


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: correctness,decode,bench")
    ap.add_argument("--lengths", default="", help="correctness lengths (default: the issue's list)")
    ap.add_argument("--variants", default="", help="timed kernel variants BV:NT:PF[:SPLIT],... (tuning)")
    ap.add_argument("--profiles", default="", help="profiled variants BV:NT:PF[:SPLIT],... (tuning)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-phase clock profile")
    ap.add_argument("--full-builtin-off", action="store_true",
                    help="time mx.fast.gated_delta_update at T=1024 only (tuning runs)")
    ARGS = ap.parse_args()
    skip = set(filter(None, ARGS.skip.split(",")))
    dev = "cpu" if ARGS.dry_run else "cuda"
    env = RESULTS["env"]
    env["date"] = time.strftime("%Y-%m-%d %H:%M")
    env["mlx"] = mx.__version__
    env["torch"] = torch.__version__
    env["backend"] = mk.backend()
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30).stdout.strip()
        env["gpu"], env["driver"] = [s.strip() for s in q.split("\n")[0].split(",")]
    except Exception:  # noqa: BLE001
        env["gpu"] = "none" if ARGS.dry_run else "?"
    try:
        import importlib.metadata as md
        env["fla"] = md.version("fla-core")
    except Exception:  # noqa: BLE001
        env["fla"] = None
    log("env", env)
    naive_recurrent_kda = fla_naive_recurrent_kda()  # the FLA harness shared with `bench kda`
    fla = None
    if not ARGS.dry_run:
        ops = fla_ops()
        if ops is None:
            raise SystemExit("FLA's chunk_kda needs a CUDA torch with fla-core and triton")
        fla = ops[:2]
    torch.manual_seed(0)
    ok = True
    if "correctness" not in skip:
        ok = correctness(dev, naive_recurrent_kda)
    if ok and "decode" not in skip:
        decode_check(dev, naive_recurrent_kda)
    if ok and "bench" not in skip:
        bench(dev, fla)
    save()
    report()
    log((OUT / "kda_device_report.md").read_text())


if __name__ == "__main__":
    main()
