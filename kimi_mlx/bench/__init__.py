"""Benchmarks: `python -m kimi_mlx.bench {kda,model,roofline} [options]` (each has --help)."""
from __future__ import annotations

import time


def best_seconds(f, reps: int = 5) -> float:
    """Best wall time of evaluating f() over `reps` runs, after one warm-up run."""
    import mlx.core as mx

    mx.eval(f())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(f())
        ts.append(time.perf_counter() - t)
    return min(ts)
