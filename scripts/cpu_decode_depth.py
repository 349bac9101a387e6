"""Decode speed at depth, ours vs mlx-lm, same weights, same process (issue 14's CPU target):
a tiny slice (4 MLA heads, kv_lora_rank 32, fp32), a synthetic cache of --depth tokens, greedy steps
of the two implementations interleaved so that machine load hits both alike.

    python scripts/cpu_decode_depth.py --depth 16384 --steps 30 [--pipelined-rounds 4] [--compiled]

--compiled adds ours with KIMI_MLX_COMPILE=on (off by default on the CPU) as a third model,
interleaved with the other two.
"""
from __future__ import annotations

import argparse
import os
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
    ap.add_argument("--compiled", action="store_true", help="also ours with KIMI_MLX_COMPILE=on, interleaved")
    a = ap.parse_args()
    c = bm.slice_config(layers=4, experts=8, vocab=1024, tiny=True)
    c.update(num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32)
    w = bm.random_weights(c)
    impls = ("ours", "mlx-lm") + (("ours-compiled",) if a.compiled else ())
    base = {i: i.removesuffix("-compiled") for i in impls}

    def use(i):  # the bench's implementation name, with the compile setting of i
        os.environ["KIMI_MLX_COMPILE"] = "on" if i.endswith("-compiled") else env_compile
        return base[i]

    env_compile = os.environ.get("KIMI_MLX_COMPILE", "")
    models = {i: bm.build(base[i], c, w, "fp32") for i in impls}
    caches = {}
    for i, m in models.items():
        cache = m.make_cache()
        if hasattr(cache, "reserve"):
            cache.reserve(a.depth + a.steps + 16)
        bm.prefill_chunk(use(i), m, mx.array([[1, 2, 3, 4]]), cache)
        bm.fill_synthetic(use(i), m, cache, a.depth)
        caches[i] = cache
    tok = mx.array([[5]])
    for i in impls:
        for _ in range(3):
            bm.decode_step(use(i), models[i], caches[i], tok)
    res = {i: [] for i in impls}
    for _ in range(a.steps):
        for i in impls:
            t = time.perf_counter()
            bm.decode_step(use(i), models[i], caches[i], tok)
            res[i].append(time.perf_counter() - t)
    for i, v in res.items():
        med = statistics.median(v)
        print(f"{i:7s} {1 / med:7.1f} tok/s   {med * 1e3:.2f} ms [{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}]")
    for i in impls[::2]:
        print(f"{i} / mlx-lm speed: {statistics.median(res['mlx-lm']) / statistics.median(res[i]):.2f}x")
    if a.pipelined_rounds:  # as generation runs: the next step queued before this one's token is read
        pipe = {i: [] for i in impls}
        for _ in range(a.pipelined_rounds):
            for i in impls:
                pipe[i].append(run.pipelined_decode(use(i), models[i], caches[i], tok, a.steps)[0])
        for i, v in pipe.items():
            print(f"{i:7s} pipelined {statistics.median(v) * 1e3:.2f} ms a token "
                  f"[{min(v) * 1e3:.2f}-{max(v) * 1e3:.2f}] over {len(v)} rounds")
        for i in impls[::2]:
            print(f"{i} / mlx-lm speed, pipelined: {statistics.median(pipe['mlx-lm']) / statistics.median(pipe[i]):.2f}x")


if __name__ == "__main__":
    main()
