"""Decode speed at depth, ours vs mlx-lm, same weights, same process (issue 14's CPU target):
a tiny slice (4 MLA heads, kv_lora_rank 32, fp32), a synthetic cache of --depth tokens, greedy steps
of the two implementations interleaved so that machine load hits both alike.

    python scripts/cpu_decode_depth.py --depth 16384 --steps 30 [--pipelined-rounds 4]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402  (optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from kimi_mlx.bench import model as bm  # noqa: E402
from kimi_mlx.bench import run  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--pipelined-rounds", type=int, default=0, help="then this many pipelined runs of --steps")
    a = ap.parse_args()
    c = bm.slice_config(layers=4, experts=8, vocab=1024, tiny=True)
    c.update(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32)
    w = bm.random_weights(c)
    impls = ("ours", "mlx-lm")
    models = {i: bm.build(i, c, w, "fp32") for i in impls}
    caches = {}
    for i, m in models.items():
        cache = m.make_cache()
        if hasattr(cache, "reserve"):
            cache.reserve(a.depth + a.steps + 16)
        bm.prefill_chunk(i, m, mx.array([[1, 2, 3, 4]]), cache)
        bm.fill_synthetic(i, m, cache, a.depth)
        caches[i] = cache
    tok = mx.array([[5]])
    for i in impls:
        for _ in range(3):
            bm.decode_step(i, models[i], caches[i], tok)
    res = {i: [] for i in impls}
    for _ in range(a.steps):
        for i in impls:
            t = time.perf_counter()
            bm.decode_step(i, models[i], caches[i], tok)
            res[i].append(time.perf_counter() - t)
    for i, v in res.items():
        med = statistics.median(v)
        print(f"{i:7s} {1 / med:7.1f} tok/s   {med * 1e3:.2f} ms [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]")
    print(f"ours / mlx-lm speed: {statistics.median(res['mlx-lm']) / statistics.median(res['ours']):.2f}x")
    if a.pipelined_rounds:  # as generation runs: the next step queued before this one's token is read
        pipe = {i: [] for i in impls}
        for _ in range(a.pipelined_rounds):
            for i in impls:
                pipe[i].append(run.pipelined_decode(i, models[i], caches[i], tok, a.steps)[0])
        for i, v in pipe.items():
            print(f"{i:7s} pipelined {statistics.median(v) * 1e3:.2f} ms a token "
                  f"[{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}] over {len(v)} rounds")
        print(f"ours / mlx-lm speed, pipelined: {statistics.median(pipe['mlx-lm']) / statistics.median(pipe['ours']):.2f}x")


if __name__ == "__main__":
    main()
