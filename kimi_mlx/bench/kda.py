"""KDA operator benchmark: prefill over T tokens and one decode step, real head shape.

    python -m kimi_mlx.bench kda                          # T = 1K, 4K (GPU: 1K..64K); 32 heads, K = V = 128
    python -m kimi_mlx.bench kda --T 1K,4K,16K,64K --json docs/bench_kda.json
    python -m kimi_mlx.bench kda --smoke                  # seconds: tiny shapes, one run each

Implementations (all compute the same operator; each run compares them at a small T unless --no-check):
  ours-cpu         kimi_mlx.ops.kda_cpu: our C kernel (chunk scan), what ops.kda.kda runs for
                   prompts on the CPU device (only there, and only where it builds)
  ours-chunked     kimi_mlx.ops.kda_chunked: the chunked form in MLX ops (the prefill path elsewhere)
  ours-recurrent   kimi_mlx.ops.kda_recurrent (reference; only up to --recurrent-max-T)
  ours-step        kimi_mlx.ops.kda_step (decode)
  mlx-fast         mx.fast.gated_delta_update with a per-channel gate
  mlx-lm           mlx_lm.models.gated_delta.gated_delta_ops (its non-Metal path), if installed

Inputs are what the model layer hands over: l2-normalised q/k, log-space gate g, beta. Peers
take the gate in linear space and q pre-scaled, so their timed region includes exp(g) and
q * K^-0.5 (a caller would pay for them). Peers run up to --peer-max-T: they are per-token
recurrences, minutes at 64K. Each timing is the best of --repeat runs (the median is in the
JSON) after a warm-up that compiles; a run stops repeating once --budget seconds are spent.
"extra MB" is MLX's peak memory above what was allocated before the run (inputs excluded).

On a GPU backend of MLX (CUDA, or Metal on a Mac) it also times the custom kernels of
metal_kernels/ from the raw projections, as the model calls them (q_raw, k_raw, f, b_raw, v;
L2 norm, gate and sigmoid inside; --kernel-dtype, bf16 by default):
  ours-kernel        metal_kernels.kda_prefill_fused (chunk scan, one dispatch)
  ours-kernel-step   metal_kernels.kda_decode_step_fused (one token; state in and out)
and, when torch with CUDA and FLA (fla-core) import, FLA's Triton kernels on the same GPU and
the same inputs:
  fla-chunk          chunk_kda with the gate, L2 norm and sigmoid in the kernel (as ours)
  fla-chunk-pregated chunk_kda on precomputed q, k, g, beta (the gate maths not timed)
  fla-recurrent      fused_recurrent_kda (prefill up to --fla-recurrent-max-T; and decode)
Kernel rows are compared with ours-kernel / ours-kernel-step ("ours ÷ this" = their tokens/s
ratio). Every timing is wall time of a synchronised call (mx.eval; torch.cuda.synchronize).
Decode is timed two ways: "decode" = one synchronised call per token (generation),
"decode-chain" = --decode-steps calls queued back to back, one sync (per-token GPU cost).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from kimi_mlx.ops.kda import kda_gates, l2norm
from kimi_mlx.ops.kda_chunked import kda_chunked
from kimi_mlx.ops.kda_cpu import available as kda_cpu_available, kda_cpu, kda_cpu_info
from kimi_mlx.ops.kda_reference import kda_recurrent, kda_step

from . import time_runs, time_torch_cuda
from .common import parse_lengths

OURS = "ours-chunked"
OURS_CPU = "ours-cpu"
KERNEL = "ours-kernel"
KERNEL_STEP = "ours-kernel-step"
OURS_NAMES = (OURS_CPU, OURS, "ours-step", KERNEL, KERNEL_STEP)  # "ours ÷ this" uses the fastest of these
GPU_DEFAULT_T = "1K,4K,16K,64K"


def tune_malloc() -> bool:
    """glibc: keep freed memory for reuse instead of unmapping it (MLX's CPU allocator frees big
    buffers to malloc, and every fresh mmap'd page is a page fault)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def make_inputs(B, T, H, K, V, seed=0):
    """Model-like inputs: l2-normalised q/k, g = -exp(A_log) * softplus(x), beta = sigmoid(b)."""
    key = mx.random.key(seed)
    kq, kk, kv, kx, kb, ka = mx.random.split(key, 6)
    q = l2norm(mx.random.normal((B, T, H, K), key=kq))
    k = l2norm(mx.random.normal((B, T, H, K), key=kk))
    v = mx.random.normal((B, T, H, V), key=kv)
    a_log = mx.random.uniform(0.0, math.log(16.0), (1, 1, H, 1), key=ka)
    x = mx.random.normal((B, T, H, K), key=kx) * 2.0 - 2.0
    g = -mx.exp(a_log) * mx.logaddexp(x, mx.zeros_like(x))
    beta = mx.sigmoid(mx.random.normal((B, T, H), key=kb))
    mx.eval(q, k, v, g, beta)
    return q, k, v, g, beta


def implementations(chunk_size: int):
    """name -> (prefill fn, decode fn); each takes (q, k, v, g, beta, state [B,H,K,V] or None)
    and returns arrays to evaluate. Peers keep their own state layout [B,H,V,K]."""
    impls = {}
    if mx.default_device().type == mx.DeviceType.cpu and kda_cpu_available():
        def cpu(q, k, v, g, b, s):
            return kda_cpu(q, k, v, g, b, initial_state=s)

        impls[OURS_CPU] = (cpu, None)  # decode stays on ours-step: see ops.kda.kda
    impls.update({
        OURS: (lambda q, k, v, g, b, s: kda_chunked(q, k, v, g, b, initial_state=s, chunk_size=chunk_size), None),
        "ours-recurrent": (lambda q, k, v, g, b, s: kda_recurrent(q, k, v, g, b, initial_state=s), None),
        "ours-step": (None, lambda q, k, v, g, b, s: kda_step(q, k, v, g, b, initial_state=s)),
    })
    if hasattr(mx.fast, "gated_delta_update"):
        def fast(q, k, v, g, b, s):
            st = None if s is None else s.swapaxes(-1, -2)
            return mx.fast.gated_delta_update(q * q.shape[-1] ** -0.5, k, v, mx.exp(g), b, initial_state=st)

        impls["mlx-fast"] = (fast, fast)
    try:
        from mlx_lm.models.gated_delta import gated_delta_ops
    except ImportError:
        gated_delta_ops = None
    if gated_delta_ops is not None:
        def lm(q, k, v, g, b, s):
            st = None if s is None else s.swapaxes(-1, -2)
            return gated_delta_ops(q * q.shape[-1] ** -0.5, k, v, mx.exp(g), b, st)

        impls["mlx-lm"] = (lm, lm)
    return impls


def timed(fn, repeat: int, budget: float) -> tuple[list[float], list[float]]:
    """Wall and process CPU seconds per run (CPU time helps on a shared machine)."""
    t = time_runs(fn, repeat, warmup=0, budget=budget)
    return t.times, t.cpu


def check(impls, H, K, V, T=96) -> dict:
    """Max |o - o_recurrent| and state difference of each implementation at a small T."""
    q, k, v, g, beta = make_inputs(1, T, H, K, V, seed=1)
    s0 = mx.random.normal((1, H, K, V), key=mx.random.key(2)) * 0.1
    o_ref, s_ref = kda_recurrent(q, k, v, g, beta, initial_state=s0)
    res = {}
    for name, (pre, _) in impls.items():
        if pre is None or name == "ours-recurrent":
            continue
        o, s = pre(q, k, v, g, beta, s0)
        if name.startswith("mlx"):
            s = s.swapaxes(-1, -2)
        res[name] = {"max_abs_o": float(mx.abs(o.astype(mx.float32) - o_ref).max()),
                     "max_abs_state": float(mx.abs(s - s_ref).max())}
    return res


def run(args, meta=None) -> dict:
    B, H, K, V = args.B, args.H, args.K, args.V
    impls = implementations(args.chunk_size)
    if args.impl:
        keep = set(args.impl.split(","))
        impls = {n: f for n, f in impls.items() if n in keep or n in (OURS, OURS_CPU)}
    rows = []
    base = [0]  # active memory before the measured runs (inputs, state)

    def record(mode, T, name, timing, tokens, per=1, dtype="float32"):
        times, cpu = ([t / per for t in ts] for ts in timing)
        best, med = min(times), statistics.median(times)
        mlx_run = not name.startswith("fla")
        rows.append({"mode": mode, "T": T, "impl": name, "dtype": dtype, "runs": len(times),
                     "seconds_best": best, "seconds_median": med, "tokens_per_s": tokens / best,
                     "cpu_seconds_best": min(cpu),
                     "extra_memory_mb": (mx.get_peak_memory() - base[0]) / 2**20 if mlx_run else None})
        if name in (KERNEL, KERNEL_STEP) or name.startswith("fla"):
            print(f"  {mode:12s} T={T:>6} {name:18s} {1e3 * best:9.3f} ms {tokens / best:14.0f} tok/s",
                  file=sys.stderr)
        if args.json and meta is not None:  # after every row: a run cut short keeps what it measured
            write_json(args.json, meta, {"rows": rows, "partial": True})

    if args.kernels_only and kernel_backend() is not None:
        impls = {}
    for T in args.T if impls else []:
        q, k, v, g, beta = make_inputs(B, T, H, K, V)
        for name, (pre, _) in impls.items():
            if pre is None:
                continue
            if name == "ours-recurrent" and T > args.recurrent_max_T:
                continue
            if name.startswith("mlx") and T > args.peer_max_T:
                continue
            w = min(T, 64)  # warm-up: compiles the same kernels on a short input
            mx.eval(pre(q[:, :w], k[:, :w], v[:, :w], g[:, :w], beta[:, :w], None))
            mx.reset_peak_memory()
            base[0] = mx.get_active_memory()
            timing = timed(lambda: pre(q, k, v, g, beta, None), args.repeat, args.budget)
            record("prefill", T, name, timing, T)
            print(f"  prefill T={T:>6} {name:15s} {T / min(timing[0]):10.0f} tok/s", file=sys.stderr)
        del q, k, v, g, beta

    if args.decode_steps > 0 and impls:
        q, k, v, g, beta = make_inputs(B, 1, H, K, V, seed=3)
        s_ours = mx.random.normal((B, H, K, V), key=mx.random.key(4)) * 0.1
        mx.eval(s_ours)
        for name, (_, dec) in impls.items():
            if dec is None:
                continue
            s0 = s_ours if name.startswith("ours") else mx.contiguous(s_ours.swapaxes(-1, -2))
            mx.eval(s0)

            def steps(dec=dec, s0=s0):
                s = s0
                for _ in range(args.decode_steps):
                    o, s = dec(q, k, v, g, beta, s)
                    mx.eval(o, s)  # one token at a time, as in generation
                return s

            steps()
            mx.reset_peak_memory()
            base[0] = mx.get_active_memory()
            timing = timed(steps, args.repeat, args.budget)
            record("decode", 1, name, timing, 1, per=args.decode_steps)
            print(f"  decode step     {name:15s} {args.decode_steps / min(timing[0]):10.0f} tok/s", file=sys.stderr)

    kernels = None
    if args.kernels and kernel_backend() is not None:
        base[0] = 0
        kernels = run_kernels(args, rows, record)
        if args.check:
            kernels["check"] = check_kernel(args)
    return {"rows": rows, "check": check(impls, H, K, V) if args.check and impls else None,
            "kernels": kernels}


# ---------------------------------------------------------------------------------------------
# GPU: our custom kernels (metal_kernels) and FLA's, from raw projections
def kernel_backend() -> str | None:
    """'cuda' or 'metal' when metal_kernels runs on this MLX, else None (CPU)."""
    try:
        import metal_kernels
    except ImportError:
        return None
    return metal_kernels.backend()


def fla_naive_recurrent_kda():
    """FLA's reference `naive_recurrent_kda` (pure PyTorch). Loaded by file path when importing
    `fla.ops` fails (it needs triton, absent on the CPU); raises ImportError without fla-core."""
    try:
        from fla.ops.kda.naive import naive_recurrent_kda
        return naive_recurrent_kda
    except ImportError:
        import importlib.metadata as md
        import importlib.util

        try:
            path = next(p for p in md.files("fla-core") or [] if str(p).endswith("ops/kda/naive.py"))
        except (md.PackageNotFoundError, StopIteration):
            raise ImportError("fla-core with fla/ops/kda/naive.py is not installed") from None
        spec = importlib.util.spec_from_file_location("fla_kda_naive", path.locate())
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.naive_recurrent_kda


def fla_ops():
    """(chunk_kda, fused_recurrent_kda, torch) when FLA and a CUDA torch import, else None."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except Exception:  # noqa: BLE001  (no torch / fla / triton)
        return None
    return chunk_kda, fused_recurrent_kda, torch


def gpu_name() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    try:
        if mx.metal.is_available():
            return str(mx.metal.device_info().get("device_name"))
    except Exception:  # noqa: BLE001
        pass
    return None


KDT = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}


def make_raw(B, T, H, K, V, dtype, seed=0):
    """Raw projections as the layer hands them to the kernel (FLA's test ranges: A in [1, 16])."""
    ks = mx.random.split(mx.random.key(seed), 7)
    raw = dict(q_raw=mx.random.normal((B, T, H, K), key=ks[0]),
               k_raw=mx.random.normal((B, T, H, K), key=ks[1]),
               v=mx.random.normal((B, T, H, V), key=ks[2]),
               f=mx.random.normal((B, T, H, K), key=ks[3]),
               b_raw=mx.random.normal((B, T, H), key=ks[4]))
    raw = {n: a.astype(dtype) for n, a in raw.items()}
    raw["A_log"] = mx.log(mx.random.uniform(1.0, 16.0, (H,), key=ks[5]))
    raw["dt_bias"] = mx.random.normal((H * K,), key=ks[6])
    mx.eval(raw)
    return raw


def _to_torch(a, torch, dtype=None):
    import numpy as np

    t = torch.from_numpy(np.array(a.astype(mx.float32))).cuda()
    return t if dtype is None else t.to(dtype)


def _fla_inputs(raw, torch, tdt):
    r = {n: _to_torch(raw[n], torch, tdt) for n in ("q_raw", "k_raw", "v", "f", "b_raw")}
    r["A_log"] = _to_torch(raw["A_log"], torch)
    r["dt_bias"] = _to_torch(raw["dt_bias"], torch)
    return r


def _fla_gates(r, torch):
    """q, k (L2-normalised), g, beta for the pre-gated chunk_kda (fp32 maths)."""
    H, K = r["q_raw"].shape[-2], r["q_raw"].shape[-1]
    q, k = r["q_raw"].float(), r["k_raw"].float()
    q = q * torch.rsqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    g = -r["A_log"].exp().view(H, 1) * torch.nn.functional.softplus(r["f"].float() + r["dt_bias"].view(H, K))
    beta = torch.sigmoid(r["b_raw"].float())
    dt = r["q_raw"].dtype
    return q.to(dt), k.to(dt), g, beta.to(dt)


def timed_torch(fn, torch, repeat: int, budget: float) -> tuple[list[float], list[float]]:
    t = time_torch_cuda(fn, torch, repeat, warmup=0, budget=budget)
    return t.times, t.cpu


def run_kernels(args, rows, record) -> dict:
    """Prefill and decode of ours-kernel(-step) and, if importable, FLA's kernels."""
    import metal_kernels as mk

    B, H, K, V = args.B, args.H, args.K, args.V
    dt = KDT[args.kernel_dtype]
    fla = fla_ops() if args.fla else None
    want = set(args.impl.split(",")) if args.impl else None

    def on(name):
        return want is None or name in want or name in (KERNEL, KERNEL_STEP)

    info = {"fla": None, "errors": {}}
    if fla is not None:
        chunk_kda, fused_recurrent_kda, torch = fla
        tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.kernel_dtype]
        try:
            import importlib.metadata as md
            info["fla"] = md.version("fla-core")
        except Exception:  # noqa: BLE001
            info["fla"] = "?"
        info["torch"] = torch.__version__

    def attempt(name, f):
        try:
            f()
        except Exception as e:  # noqa: BLE001  (a peer failing must not lose the others)
            info["errors"][name] = repr(e)[:800]
            print(f"  {name}: {e!r}"[:300], file=sys.stderr)

    for T in args.T:
        raw = make_raw(B, T, H, K, V, dt, seed=T)

        def ours(raw=raw):
            return mk.kda_prefill_fused(raw["q_raw"], raw["k_raw"], raw["v"], raw["f"], raw["dt_bias"],
                                        raw["A_log"], raw["b_raw"])

        def run_ours(T=T, ours=ours):
            mx.eval(ours())  # compile
            mx.reset_peak_memory()
            record("prefill", T, KERNEL, timed(ours, args.repeat, args.budget), T, dtype=args.kernel_dtype)

        attempt(KERNEL, run_ours)
        if fla is not None and any(on(n) for n in ("fla-chunk", "fla-chunk-pregated", "fla-recurrent")):
            r = _fla_inputs(raw, torch, tdt)
            fused = dict(A_log=r["A_log"], dt_bias=r["dt_bias"], output_final_state=True,
                         use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
                         use_beta_sigmoid_in_kernel=True)

            def fla_chunk(r=r, fused=fused):
                return chunk_kda(q=r["q_raw"], k=r["k_raw"], v=r["v"], g=r["f"], beta=r["b_raw"], **fused)

            def fla_rec(r=r, fused=fused):
                return fused_recurrent_kda(q=r["q_raw"], k=r["k_raw"], v=r["v"], g=r["f"], beta=r["b_raw"],
                                           **fused)

            def run_torch(name, fn, T=T):
                with torch.inference_mode():
                    fn()  # compile / autotune
                    record("prefill", T, name, timed_torch(fn, torch, args.repeat, args.budget), T,
                           dtype=args.kernel_dtype)

            if on("fla-chunk"):
                attempt("fla-chunk", lambda: run_torch("fla-chunk", fla_chunk))
            if on("fla-chunk-pregated"):
                def pregated(r=r):
                    q, k, g, beta = _fla_gates(r, torch)
                    run_torch("fla-chunk-pregated",
                              lambda: chunk_kda(q=q, k=k, v=r["v"], g=g, beta=beta, output_final_state=True))
                attempt("fla-chunk-pregated", pregated)
            if on("fla-recurrent") and T <= args.fla_recurrent_max_T:
                attempt("fla-recurrent", lambda: run_torch("fla-recurrent", fla_rec))
            del r
            torch.cuda.empty_cache()
        del raw

    if args.decode_steps > 0:
        N = args.decode_steps
        raw = make_raw(B, 1, H, K, V, dt, seed=7)
        S0 = mx.random.normal((B, H, K, V), key=mx.random.key(8)) * 0.1
        mx.eval(S0)

        def step(S):
            return mk.kda_decode_step_fused(raw["q_raw"], raw["k_raw"], raw["v"], raw["f"], raw["dt_bias"],
                                            raw["A_log"], raw["b_raw"], S)

        def ours_sync():
            S = S0
            for _ in range(N):
                o, S = step(S)
                mx.eval(o, S)  # one token at a time, as in generation
            return S

        def ours_chain():
            S, outs = S0, []
            for _ in range(N):
                o, S = step(S)
                outs.append(o)
            return outs + [S]

        def run_ours_dec():
            for mode, fn in (("decode", ours_sync), ("decode-chain", ours_chain)):
                mx.eval(fn())
                mx.reset_peak_memory()
                record(mode, 1, KERNEL_STEP, timed(fn, args.repeat, args.budget), 1, per=N,
                       dtype=args.kernel_dtype)

        attempt(KERNEL_STEP, run_ours_dec)
        if fla is not None and on("fla-recurrent"):
            def fla_dec():
                r = _fla_inputs(raw, torch, tdt)
                St = _to_torch(S0, torch)

                def one():
                    return fused_recurrent_kda(q=r["q_raw"], k=r["k_raw"], v=r["v"], g=r["f"], beta=r["b_raw"],
                                               A_log=r["A_log"], dt_bias=r["dt_bias"], initial_state=St,
                                               output_final_state=True, use_qk_l2norm_in_kernel=True,
                                               use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)

                def sync():
                    for _ in range(N):
                        one()
                        torch.cuda.synchronize()

                def chain():
                    for _ in range(N):
                        one()

                with torch.inference_mode():
                    for mode, fn in (("decode", sync), ("decode-chain", chain)):
                        fn()
                        record(mode, 1, "fla-recurrent", timed_torch(fn, torch, args.repeat, args.budget), 1,
                               per=N, dtype=args.kernel_dtype)

            attempt("fla-recurrent decode", fla_dec)
    return info


def check_kernel(args, T=96) -> dict:
    """ours-kernel against ours-chunked (fp32, gates by MLX ops) on the same raw inputs."""
    import metal_kernels as mk

    B, H, K, V = args.B, args.H, args.K, args.V
    raw = make_raw(B, T, H, K, V, KDT[args.kernel_dtype], seed=11)
    f32 = mx.float32
    q, k, g, beta = kda_gates(raw["q_raw"], raw["k_raw"], raw["f"], raw["b_raw"], raw["dt_bias"], raw["A_log"])
    o_ref, s_ref = kda_chunked(q, k, raw["v"].astype(f32), g, beta)
    o, s = mk.kda_prefill_fused(raw["q_raw"], raw["k_raw"], raw["v"], raw["f"], raw["dt_bias"],
                                raw["A_log"], raw["b_raw"])

    def rel(a, b):
        a, b = a.astype(f32), b.astype(f32)
        return float(mx.sqrt(((a - b) ** 2).sum()) / mx.sqrt((b ** 2).sum()))

    return {"T": T, "rel_err_o": rel(o, o_ref), "rel_err_state": rel(s, s_ref)}


def ours_for(rows):
    """(mode, T) -> the row the others are compared with: the fastest of ours (OURS_NAMES)."""
    ours = {}
    for r in rows:
        if r["impl"] in OURS_NAMES:
            best = ours.get((r["mode"], r["T"]))
            if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                ours[(r["mode"], r["T"])] = r
    return ours


def ratios(rows) -> list[dict]:
    out = []
    ours = ours_for(rows)
    for r in rows:
        base = ours.get((r["mode"], r["T"]))
        if base is None or r is base:
            continue
        out.append({"mode": r["mode"], "T": r["T"], "ours": base["impl"], "peer": r["impl"],
                    "speedup": base["tokens_per_s"] / r["tokens_per_s"]})
    return out


def print_table(result, meta) -> None:
    rows = result["rows"]
    ours = ours_for(rows)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        for r in rows:
            base = ours.get((r["mode"], r["T"]))
            ratio = "" if base is None or base is r else f"  ours/this {base['tokens_per_s'] / r['tokens_per_s']:.2f}"
            print(f"{r['mode']:12s} {r['T']:>7} {r['impl']:18s} {r.get('dtype', 'float32'):8s} "
                  f"{1e3 * r['seconds_best']:10.3f} ms {r['tokens_per_s']:14.0f} tok/s{ratio}")
        return
    title = (f"KDA operator: B={meta['B']} H={meta['H']} K={meta['K']} V={meta['V']}, "
             f"{meta.get('gpu') or meta['device']}, chunk {meta['chunk_size']}")
    table = Table(title=title)
    for col, just in (("mode", "left"), ("T", "right"), ("impl", "left"), ("dtype", "left"), ("ms", "right"),
                      ("tokens/s", "right"), ("ours ÷ this", "right"), ("CPU s", "right"),
                      ("extra MB", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        base = ours.get((r["mode"], r["T"]))
        ratio = "" if base is None or base is r else f"{base['tokens_per_s'] / r['tokens_per_s']:.2f}×"
        mem = r["extra_memory_mb"]
        table.add_row(r["mode"], str(r["T"]), r["impl"], r.get("dtype", "float32"),
                      f"{1e3 * r['seconds_best']:.3f}",
                      f"{r['tokens_per_s']:,.0f}", ratio, f"{r['cpu_seconds_best']:.3f}",
                      "-" if mem is None else f"{mem:,.0f}")
    Console(width=None if sys.stdout.isatty() else 130).print(table)
    if result.get("check"):
        for name, c in result["check"].items():
            print(f"check {name:15s} max|o - recurrent| {c['max_abs_o']:.2e}  "
                  f"max|state - recurrent| {c['max_abs_state']:.2e}")


def write_json(path: Path, meta: dict, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **result, "ratios": ratios(result["rows"])}, indent=2))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_mlx.bench kda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=parse_lengths, default=None,
                   help=f"prefill lengths, comma-separated, K = 1024 (default 1K,4K; GPU {GPU_DEFAULT_T})")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--K", type=int, default=128)
    p.add_argument("--V", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--impl", help="comma-separated subset (ours-chunked always runs)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget", type=float, default=30.0, help="seconds per measurement before it stops repeating")
    p.add_argument("--recurrent-max-T", type=int, default=1024)
    p.add_argument("--peer-max-T", type=int, default=4096)
    p.add_argument("--decode-steps", type=int, default=20, help="0 skips the decode step")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the agreement check")
    p.add_argument("--malloc-tune", action="store_true",
                   help="Linux: stop glibc unmapping freed buffers (fewer page faults; affects every impl)")
    p.add_argument("--json", type=Path, help="write results here")
    p.add_argument("--smoke", action="store_true",
                   help="seconds-long plumbing run: T=64, H=2, K=V=32, one run, 2 decode steps")
    p.add_argument("--no-kernels", dest="kernels", action="store_false",
                   help="GPU: skip the custom kernels and FLA")
    p.add_argument("--kernel-dtype", choices=sorted(KDT), default="bf16",
                   help="input dtype of the kernel rows (default bf16)")
    p.add_argument("--no-fla", dest="fla", action="store_false", help="GPU: skip FLA's kernels")
    p.add_argument("--kernels-only", action="store_true",
                   help="GPU: only the kernel rows (ours-kernel and FLA), not the MLX-ops implementations")
    p.add_argument("--fla-recurrent-max-T", type=int, default=65536,
                   help="longest prefill timed with FLA's fused_recurrent_kda")
    args = p.parse_args(argv)
    if args.smoke:
        args.T = args.T or [64]
        args.H, args.K, args.V = 2, 32, 32
        args.repeat, args.decode_steps, args.budget = 1, 2, 5.0
        args.recurrent_max_T = min(args.recurrent_max_T, 64)
    kb = kernel_backend() if args.kernels else None
    if args.T is None:
        args.T = parse_lengths(GPU_DEFAULT_T if kb is not None else "1K,4K")

    tuned = tune_malloc() if args.malloc_tune else False
    meta = {"B": args.B, "H": args.H, "K": args.K, "V": args.V, "chunk_size": args.chunk_size,
            "dtype": "float32", "device": str(mx.default_device()), "mlx": mx.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "blas": kimi_mlx._blas.LOADED, "malloc_tuned": tuned,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "kda_cpu": kda_cpu_info() if mx.default_device().type == mx.DeviceType.cpu else None,
            "repeat": args.repeat, "kernel_backend": kb, "gpu": gpu_name() if kb else None,
            "kernel_dtype": args.kernel_dtype if kb else None, "smoke": args.smoke}
    result = run(args, meta)
    print_table(result, meta)
    if args.json:
        write_json(args.json, meta, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
