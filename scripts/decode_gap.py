"""Why bench model's synced decode step is slower than bench step's: the same greedy step of the
slice model timed under each condition that differs between the two benchmarks, in one process.

    python3 scripts/decode_gap.py [--depth 4096] [--steps 12] [--json out.json]

Conditions (ours; mlx-lm where it applies): after a real chunked prefill or on a synthetic cache
(a short prefill + random MLA rows, as bench step does), each implementation's steps alone or
interleaved with the other's (as bench model does). Each step is split into building the lazy
graph in Python and evaluating it.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402
import mlx.core as mx  # noqa: E402

from kimi_mlx.bench import model as mb  # noqa: E402

ROWS = []


def timed_step(impl, model, cache, tok):
    t0 = time.perf_counter()
    y = mx.argmax(mb._logits_last(impl, model, tok, cache), axis=-1)[:, None]
    t1 = time.perf_counter()
    mx.eval(y)
    mb._eval_cache(impl, cache)
    t2 = time.perf_counter()
    return y, (t1 - t0) * 1e3, (t2 - t0) * 1e3


def record(cond, impl, samples):
    build = [b for b, _ in samples]
    total = [t for _, t in samples]
    r = {"condition": cond, "impl": impl, "step_ms_median": statistics.median(total),
         "step_ms_min": min(total), "step_ms_max": max(total), "build_ms_median": statistics.median(build),
         "step_ms_all": [round(x, 2) for x in total]}
    ROWS.append(r)
    print(f"{cond:34s} {impl:7s} step {r['step_ms_median']:6.2f} ms [{r['step_ms_min']:.2f}-{r['step_ms_max']:.2f}]"
          f"  build {r['build_ms_median']:.2f} ms", flush=True)


def run(states, impls, cond, steps):
    got = {i: [] for i in impls}
    for k in range(steps + 1):
        for i in impls:
            m, cache, tok = states[i]
            tok, b, t = timed_step(i, m, cache, tok)
            states[i][2] = tok
            if k:
                got[i].append((b, t))
    for i in impls:
        record(cond, i, got[i])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtype", default="bf16", help="bf16 (GPU) or fp32 (mlx-lm's CPU experts take fp32 only)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (a smoke test)")
    ap.add_argument("--json", default="decode_gap.json")
    a = ap.parse_args()
    c = mb.slice_config(a.layers, a.experts, a.vocab, a.tiny)
    base = mb.random_weights(c, 0)
    impls = ["ours", "mlx-lm"]
    models = {}
    for i in impls:
        models[i] = mb.build(i, c, base, a.dtype)
        mb.warm_up(i, models[i], mb.warmup_chunk(2048), a.vocab, 1, 2.0)
    gc.collect()
    mx.clear_cache()
    st = {}
    for i in impls:
        _, cache, tok = mb.prefill_one(i, models[i], a.depth, 2048, a.vocab, 0)
        st[i] = [models[i], cache, tok]
    run(st, ["ours"], "prefilled, alone", a.steps)
    run(st, ["mlx-lm"], "prefilled, alone", a.steps)
    run(st, impls, "prefilled, interleaved", a.steps)
    run(st, ["ours"], "prefilled, alone again", a.steps)
    del st
    gc.collect()
    mx.clear_cache()
    st = {}
    for i in impls:
        _, cache, tok = mb.prefill_one(i, models[i], 64, 2048, a.vocab, 0, reserve=a.depth + 256)
        mb.fill_synthetic(i, models[i], cache, a.depth, 0)
        st[i] = [models[i], cache, tok]
    run(st, ["ours"], "synthetic, alone", a.steps)
    run(st, impls, "synthetic, interleaved", a.steps)
    # the same token every step (bench step's time_runs repeats one call with one input token)
    m, cache, tok = st["ours"]
    got = []
    for k in range(a.steps + 1):
        _, b, t = timed_step("ours", m, cache, tok)
        if k:
            got.append((b, t))
    record("synthetic, same input token", "ours", got)
    Path(a.json).write_text(json.dumps({"device": str(mx.default_device()), "depth": a.depth, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
