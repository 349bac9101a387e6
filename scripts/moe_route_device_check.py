"""The MoE routing kernel on a GPU (MLX-CUDA, or Metal): correctness against route's MLX ops and
the host cost of each, at the real model's width (256 experts, 8 picks, renormalised, scaled).

    python scripts/moe_route_device_check.py [--calls 200] [--repeats 5]

Prints one JSON line per check and per timing, then a summary line. Timings are ms a call, the
median of the repeats, two ways: a batch of `calls` calls on the same input evaluated together
(one mx.eval: launches back to back) and `calls` calls each evaluated on its own (mx.eval after
every call: launch plus a round trip).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx.model import moe as M  # noqa: E402
from metal_kernels import moe as K  # noqa: E402

E, TOP_K, SCALING = 256, 8, 2.446


def emit(**kw):
    print(json.dumps(kw), flush=True)
    return kw


def reference(logits, bias):
    """route's MLX ops (the path KIMI_MLX_MOE_ROUTE=reference takes)."""
    return M.route_reference(logits, bias, TOP_K, 1, 1, True, SCALING)


def kernel(logits, bias):
    return K.moe_route(logits, bias, TOP_K, True, SCALING)


def check(N: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = mx.array(rng.standard_normal((N, E)).astype(np.float32) * 2)
    bias = mx.array(rng.uniform(0, 0.4, E).astype(np.float32))
    ki, kw = kernel(logits, bias)
    ri, rw = reference(logits, bias)
    mx.eval(ki, kw, ri, rw)
    ki, kw, ri, rw = (np.array(a) for a in (ki, kw, ri, rw))
    ko, ro = np.argsort(ki, -1), np.argsort(ri, -1)
    ki, kw = np.take_along_axis(ki, ko, -1), np.take_along_axis(kw, ko, -1)
    ri, rw = np.take_along_axis(ri, ro, -1), np.take_along_axis(rw, ro, -1)
    same = bool((ki == ri).all())
    diff = float(np.abs(kw - rw).max()) if same else None
    return emit(check="moe_route", N=N, E=E, k=TOP_K, same_index_sets=same,
                rows_differing=int((ki != ri).any(-1).sum()), max_abs_weight_diff=diff,
                ok=same and diff is not None and diff < 1e-5)


def timing(name, fn, N: int, calls: int, repeats: int):
    rng = np.random.default_rng(N)
    logits = mx.array(rng.standard_normal((N, E)).astype(np.float32))
    bias = mx.array(rng.uniform(0, 0.4, E).astype(np.float32))
    mx.eval(logits, bias)
    mx.eval(fn(logits, bias))  # warm: builds the kernel
    batch, single = [], []
    for _ in range(repeats):
        mx.synchronize()
        t = time.perf_counter()
        outs = [fn(logits, bias) for _ in range(calls)]
        mx.eval(outs)
        mx.synchronize()
        batch.append((time.perf_counter() - t) * 1e3 / calls)
        t = time.perf_counter()
        for _ in range(calls):
            mx.eval(fn(logits, bias))
        mx.synchronize()
        single.append((time.perf_counter() - t) * 1e3 / calls)
    return emit(timing=name, N=N, calls=calls, ms_per_call_batch=statistics.median(batch),
                ms_per_call_each_eval=statistics.median(single), batch_all=batch, each_eval_all=single)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    be = K.backend()
    emit(device=str(mx.default_device()), backend=be, mlx=mx.__version__)
    if be is None:
        emit(error="no kernel backend here (a GPU with MLX-CUDA or Metal is needed)")
        return 1
    checks = [check(1, 0), check(64, 1)]
    times = {}
    for N in (1, 64):
        for name, fn in (("kernel", kernel), ("mlx_ops", reference)):
            times[(name, N)] = timing(name, fn, N, args.calls, args.repeats)
    emit(summary="moe_route", ok=all(c["ok"] for c in checks),
         **{f"{name}_N{N}_ms_batch": round(t["ms_per_call_batch"], 4) for (name, N), t in times.items()},
         **{f"{name}_N{N}_ms_each_eval": round(t["ms_per_call_each_eval"], 4) for (name, N), t in times.items()})
    return 0 if all(c["ok"] for c in checks) else 2


if __name__ == "__main__":
    sys.exit(main())
