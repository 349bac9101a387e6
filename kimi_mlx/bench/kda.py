"""KDA operator benchmark: prefill over T tokens and one decode step, real head shape.

    python -m kimi_mlx.bench kda                          # T = 1K, 4K; 32 heads, K = V = 128
    python -m kimi_mlx.bench kda --T 1K,4K,16K,64K --json docs/bench_kda.json

Implementations (all compute the same operator; `--check` compares them at a small T):
  ours-chunked     kimi_mlx.ops.kda_chunked (the prefill path)
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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from kimi_mlx.ops.kda_chunked import kda_chunked
from kimi_mlx.ops.kda_reference import kda_recurrent, kda_step

OURS = "ours-chunked"


def parse_lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        mult = 1024 if part.endswith("K") else 1
        out.append(int(float(part.rstrip("K")) * mult))
    return out


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

    def l2(x):
        return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + 1e-6)

    q = l2(mx.random.normal((B, T, H, K), key=kq))
    k = l2(mx.random.normal((B, T, H, K), key=kk))
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
    impls = {
        OURS: (lambda q, k, v, g, b, s: kda_chunked(q, k, v, g, b, initial_state=s, chunk_size=chunk_size), None),
        "ours-recurrent": (lambda q, k, v, g, b, s: kda_recurrent(q, k, v, g, b, initial_state=s), None),
        "ours-step": (None, lambda q, k, v, g, b, s: kda_step(q, k, v, g, b, initial_state=s)),
    }
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
    times, cpu = [], []
    start = time.perf_counter()
    for _ in range(max(1, repeat)):
        t, c = time.perf_counter(), time.process_time()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if time.perf_counter() - start > budget:
            break
    return times, cpu


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


def run(args) -> dict:
    B, H, K, V = args.B, args.H, args.K, args.V
    impls = implementations(args.chunk_size)
    if args.impl:
        keep = set(args.impl.split(","))
        impls = {n: f for n, f in impls.items() if n in keep or n == OURS}
    rows = []
    base = [0]  # active memory before the measured runs (inputs, state)

    def record(mode, T, name, timing, tokens, per=1):
        times, cpu = ([t / per for t in ts] for ts in timing)
        best, med = min(times), statistics.median(times)
        rows.append({"mode": mode, "T": T, "impl": name, "runs": len(times),
                     "seconds_best": best, "seconds_median": med, "tokens_per_s": tokens / best,
                     "cpu_seconds_best": min(cpu),
                     "extra_memory_mb": (mx.get_peak_memory() - base[0]) / 2**20})

    for T in args.T:
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

    if args.decode_steps > 0:
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

    return {"rows": rows, "check": check(impls, H, K, V) if args.check else None}


def ratios(rows) -> list[dict]:
    out = []
    ours = {(r["mode"], r["T"]): r for r in rows if r["impl"] in (OURS, "ours-step")}
    for r in rows:
        base = ours.get((r["mode"], r["T"]))
        if base is None or r is base:
            continue
        out.append({"mode": r["mode"], "T": r["T"], "ours": base["impl"], "peer": r["impl"],
                    "speedup": base["tokens_per_s"] / r["tokens_per_s"]})
    return out


def print_table(result, meta) -> None:
    rows = result["rows"]
    ours = {(r["mode"], r["T"]): r for r in rows if r["impl"] in (OURS, "ours-step")}
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        for r in rows:
            print(f"{r['mode']:8s} {r['T']:>7} {r['impl']:15s} {r['tokens_per_s']:10.0f} tok/s")
        return
    title = (f"KDA operator: B={meta['B']} H={meta['H']} K={meta['K']} V={meta['V']}, fp32, "
             f"{meta['device']}, chunk {meta['chunk_size']}")
    table = Table(title=title)
    for col, just in (("mode", "left"), ("T", "right"), ("impl", "left"), ("ms", "right"),
                      ("tokens/s", "right"), ("ours ÷ this", "right"), ("CPU s", "right"),
                      ("extra MB", "right")):
        table.add_column(col, justify=just, no_wrap=True)
    for r in rows:
        base = ours.get((r["mode"], r["T"]))
        ratio = "" if base is None or base is r else f"{base['tokens_per_s'] / r['tokens_per_s']:.1f}×"
        table.add_row(r["mode"], str(r["T"]), r["impl"], f"{1e3 * r['seconds_best']:.2f}",
                      f"{r['tokens_per_s']:,.0f}", ratio, f"{r['cpu_seconds_best']:.3f}",
                      f"{r['extra_memory_mb']:,.0f}")
    Console(width=None if sys.stdout.isatty() else 130).print(table)
    if result.get("check"):
        for name, c in result["check"].items():
            print(f"check {name:15s} max|o - recurrent| {c['max_abs_o']:.2e}  "
                  f"max|state - recurrent| {c['max_abs_state']:.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_mlx.bench kda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=parse_lengths, default=parse_lengths("1K,4K"),
                   help="prefill lengths, comma-separated, K = 1024 (default 1K,4K)")
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
    args = p.parse_args(argv)

    tuned = tune_malloc() if args.malloc_tune else False
    meta = {"B": args.B, "H": args.H, "K": args.K, "V": args.V, "chunk_size": args.chunk_size,
            "dtype": "float32", "device": str(mx.default_device()), "mlx": mx.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "blas": kimi_mlx._blas.LOADED, "malloc_tuned": tuned,
            "repeat": args.repeat}
    result = run(args)
    print_table(result, meta)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, **result, "ratios": ratios(result["rows"])}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
