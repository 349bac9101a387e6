"""Roofline: this machine's memory bandwidth and matmul throughput, and how close the model gets.

    python -m kimi_mlx.bench roofline                                  # limits + a quick slice run
    python -m kimi_mlx.bench roofline --model-json docs/bench_model.json --json docs/bench_roofline.json

Decode is bounded by bandwidth: every token reads the active weights (dense layers, the router,
k of E experts, the shared expert, lm_head) plus the cache (KDA state read and written, MLA
latent rows up to the depth). On MLX's CPU backend it is in practice bounded by the one-row
quantized / bf16 matmul kernels (single-threaded, ~1-4 GFLOP/s): the "kernel bound" column. Prefill is bounded by matmul throughput: about 2 FLOPs per active
weight per token plus the attention work. The fractions printed are measured / bound.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from . import best_seconds, time_runs
from .common import fmt_len, machine_info, model_costs

def _best(f, reps: int = 5) -> float:
    return best_seconds(f, reps)


def _raw_sgemv_GBps(m: np.ndarray, x: np.ndarray) -> float | None:
    """cblas_sgemv of the BLAS that kimi_mlx loaded, called directly (None if none was loaded)."""
    import ctypes

    from .. import _blas

    fn = None
    for lib in _blas._LIBS:
        for name in ("cblas_sgemv", "scipy_cblas_sgemv"):
            fn = fn or getattr(lib, name, None)
    if fn is None:
        return None
    P, I_ = ctypes.c_void_p, ctypes.c_int
    fn.restype = None
    fn.argtypes = [I_, I_, I_, I_, ctypes.c_float, P, I_, P, I_, ctypes.c_float, P, I_]
    rows, cols = m.shape
    y = np.zeros(rows, np.float32)
    xs = np.ascontiguousarray(x.reshape(-1))
    t = time_runs(lambda: fn(101, 111, rows, cols, 1.0, m.ctypes.data, cols, xs.ctypes.data, 1, 0.0, y.ctypes.data, 1),
                  reps=5, warmup=0)
    return m.nbytes / t.min / 1e9


def copy_bandwidth(mib: int, dtype=mx.float32, reps: int = 5) -> dict:
    """Read + write bandwidth of an elementwise op over `mib` MiB (a true copy: every byte read
    once and written once): 2 * nbytes / time, median and best."""
    a = mx.random.uniform(shape=(mib * 2**20 // dtype.size,)).astype(dtype)
    mx.eval(a)
    t = time_runs(lambda: a + 1, reps)
    out = {"op": f"x + 1 over {a.nbytes / 2**30:.2f} GiB of {str(dtype).split('.')[-1]}", "bytes": 2 * a.nbytes,
           "GBps_median": 2 * a.nbytes / t.median / 1e9, "GBps_best": 2 * a.nbytes / t.min / 1e9, **t.ms()}
    del a
    mx.clear_cache()
    return out


def measure_limits(mib: int = 512, n: int = 2048) -> dict:
    """Best of a few runs each (the box may be shared)."""
    out = {}
    a = mx.random.uniform(shape=(mib * 2**20 // 4,))
    mx.eval(a)
    nbytes = a.nbytes
    out["mlx_copy_GBps"] = copy_bandwidth(mib)["GBps_best"]
    out["mlx_reduce_GBps"] = nbytes / _best(lambda: a.sum()) / 1e9
    an = np.asarray(a)
    bn = np.empty_like(an)
    out["numpy_copy_GBps"] = 2 * nbytes / time_runs(lambda: np.copyto(bn, an), reps=5, warmup=0).min / 1e9
    side = int(np.sqrt(a.size))
    m = a[: side * side].reshape(side, side)
    x = mx.random.uniform(shape=(side, 1))
    mx.eval(m, x)
    # MLX sends a matrix-vector product to sgemm, which packs the matrix: well below the bandwidth
    out["mlx_matvec_GBps"] = m.nbytes / _best(lambda: m @ x) / 1e9
    gemv = _raw_sgemv_GBps(np.asarray(m), np.asarray(x))
    if gemv:
        out["blas_sgemv_GBps"] = gemv  # the loaded BLAS's own sgemv: multi-threaded matrix read
    out["bandwidth_GBps"] = max(v for k, v in out.items() if k.endswith("GBps"))
    del a, an, bn, m
    A = mx.random.normal((n, n))
    B = mx.random.normal((n, n))
    mx.eval(A, B)
    out["matmul_fp32_GFLOPs"] = 2 * n ** 3 / _best(lambda: A @ B, 3) / 1e9
    try:
        nb = min(1024, n)
        Ab, Bb = A[:nb, :nb].astype(mx.bfloat16), B[:nb, :nb].astype(mx.bfloat16)
        out["matmul_bf16_GFLOPs"] = 2 * nb ** 3 / _best(lambda: Ab @ Bb, 2) / 1e9
    except Exception as e:  # not every backend has bf16 matmul
        out["matmul_bf16_GFLOPs"] = None
        out["matmul_bf16_error"] = str(e)[:200]
    rows = min(256, n)
    wq, s, b = mx.quantize(A, group_size=64, bits=4)
    X = A[:rows]
    mx.eval(wq, s, b, X)
    out["qmm_q4_GFLOPs"] = 2 * rows * n * n / _best(lambda: mx.quantized_matmul(X, wq, s, b, transpose=True), 2) / 1e9
    # one row (decode), as the CPU fast path calls them: fp32 input, bf16 scales / bf16 weight
    sb, bb = s.astype(mx.bfloat16), b.astype(mx.bfloat16)
    x1 = A[:1]
    Ab = A.astype(mx.bfloat16)
    mx.eval(sb, bb, x1, Ab)
    out["qmv_q4_GFLOPs"] = 2 * n * n / _best(lambda: mx.quantized_matmul(x1, wq, sb, bb, transpose=True), 3) / 1e9
    out["qmv_q4_GBps"] = (wq.nbytes + sb.nbytes + bb.nbytes) / _best(
        lambda: mx.quantized_matmul(x1, wq, sb, bb, transpose=True), 3) / 1e9
    try:
        out["matvec_bf16_GFLOPs"] = 2 * n * n / _best(lambda: x1.astype(mx.bfloat16) @ Ab.T, 3) / 1e9
    except Exception:
        pass
    return out


def analyse(limits: dict, results: list[dict], config: dict | None = None) -> list[dict]:
    """Measured / bound for every result with a measured prefill or decode. With the model's config
    the per-token costs are recomputed here (the JSON may come from an older run)."""
    rows = []
    bw, fl = limits["bandwidth_GBps"] * 1e9, limits["matmul_fp32_GFLOPs"] * 1e9
    for r in results:
        if not (r.get("prefill_tok_s") or r.get("decode_tok_s")):
            continue
        if config is not None:
            r = {**r, **model_costs(config, r["dtype"], r["length"])}
        dec_bound = bw / r["decode_bytes_per_token"]
        pre_bound = fl / r["prefill_flops_per_token"]
        dec, pre = r.get("decode_tok_s"), r.get("prefill_tok_s")
        # the kernel bound: decode's matmuls at the one-row rate of the kernel that runs them
        # (MLX's CPU quantized matvec for q4, bf16 matvec for bf16; fp32 goes to BLAS: bandwidth)
        kern = {"q4": limits.get("qmv_q4_GFLOPs"), "bf16": limits.get("matvec_bf16_GFLOPs")}.get(r["dtype"])
        kern_bound = kern * 1e9 / (2 * r["active_params"]) if kern else None
        rows.append({"dtype": r["dtype"], "impl": r["impl"], "length": r["length"],
                     "decode_tok_s": dec, "decode_bound_tok_s": dec_bound,
                     "decode_fraction": dec / dec_bound if dec else None,
                     "decode_depth": r.get("decode_depth"),
                     "decode_kernel_bound_tok_s": kern_bound,
                     "decode_kernel_fraction": dec / kern_bound if dec and kern_bound else None,
                     "prefill_tok_s": pre, "prefill_bound_tok_s": pre_bound,
                     "prefill_fraction": pre / pre_bound if pre else None,
                     "decode_bytes_per_token": r["decode_bytes_per_token"],
                     "prefill_flops_per_token": r["prefill_flops_per_token"]})
    return rows


def print_tables(limits: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Machine limits (best of several runs)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in limits.items():
        if isinstance(v, float):
            t.add_row(k, f"{v:.1f}")
    Console().print(t)
    if not rows:
        return
    t = Table(title="Roofline: measured / bound")
    for col in ("dtype", "impl", "context", "decode tok/s", "bandwidth bound", "fraction", "kernel bound",
                "fraction", "prefill tok/s", "FLOP bound", "fraction"):
        t.add_column(col, justify="left" if col in ("dtype", "impl") else "right")
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    for r in rows:
        t.add_row(r["dtype"], r["impl"], fmt_len(r["length"]), f(r["decode_tok_s"], ".2f"),
                  f(r["decode_bound_tok_s"], ".1f"), f(r["decode_fraction"], ".1%"),
                  f(r.get("decode_kernel_bound_tok_s"), ".2f"), f(r.get("decode_kernel_fraction"), ".0%"),
                  f(r["prefill_tok_s"], ".1f"),
                  f(r["prefill_bound_tok_s"], ".1f"), f(r["prefill_fraction"], ".0%"))
    Console(width=150).print(t)


def quick_results(length: int = 1024, dtype: str = "q4", tiny: bool = False) -> list[dict]:
    """A small built-in run of our slice model (when no model-bench JSON is given)."""
    from . import model as mb

    c = mb.slice_config(tiny=tiny)
    base = mb.random_weights(c)
    model = mb.build("ours", c, base, dtype)
    del base
    mb.warm_up("ours", model, mb.warmup_chunk(2048), c["vocab_size"], 1)
    r = {"dtype": dtype, "impl": "ours", "length": length, **model_costs(c, dtype, length)}
    r.update(mb.run_length("ours", model, length, 2048, 4, c["vocab_size"]))
    return [r]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench roofline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-json", help="results of `python -m kimi_mlx.bench model` (default: a quick run)")
    ap.add_argument("--quick-length", type=int, default=1024)
    ap.add_argument("--quick-dtype", default="q4")
    ap.add_argument("--tiny", action="store_true", help="quick run: tiny model widths (smoke tests)")
    ap.add_argument("--mib", type=int, default=512, help="bandwidth test array size (MiB)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="matmul test size (n x n)")
    ap.add_argument("--json", default="out/bench_roofline.json")
    a = ap.parse_args(argv)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, BLAS: {info['blas'].get('source')}", flush=True)
    limits = measure_limits(a.mib, a.matmul_n)
    config = None
    if a.model_json:
        mj = json.loads(Path(a.model_json).read_text())
        results, config = mj["results"], mj.get("config")
    else:
        results = quick_results(a.quick_length, a.quick_dtype, a.tiny)
    rows = analyse(limits, results, config)
    print_tables(limits, rows)
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": info, "limits": limits, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
