"""Compiled decode steps (KIMI_MLX_COMPILE) against the uncompiled ones, same weights and cache, on
the default device: the logits of each greedy step, max |diff| / max |logit|, and the tokens.

    python scripts/decode_compile_check.py --dtype bf16 --experts 256 --depth 4096 --steps 16

--ref-env NAME=VALUE (repeatable): the reference runs compiled too, with these settings, e.g.
`--ref-env KIMI_MLX_MOE_STACK=off` checks the stacked experts against the layers one by one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402  (optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from kimi_mlx.bench import model as bm  # noqa: E402


def run(model, cache, steps, compile_on, env=()):
    os.environ["KIMI_MLX_COMPILE"] = "on" if compile_on else "off"
    for name, _ in env:
        os.environ.pop(name, None)
    os.environ.update(dict(env))
    for layer in model.layers:  # traced under other settings: trace again
        layer.__dict__.pop("_compiled", None)
    tok, logits, toks = mx.array([[5]]), [], []
    for _ in range(steps):
        out = model(tok, cache=cache)[:, -1].astype(mx.float32)
        mx.eval(out)
        logits.append(out)
        tok = mx.argmax(out, axis=-1)[None]
        toks.append(tok.item())
    return logits, toks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--mla-bits", type=int, choices=(8,), default=None, help="an 8-bit MLA cache")
    ap.add_argument("--ref-env", action="append", default=[], help="NAME=VALUE: the reference runs compiled with it")
    a = ap.parse_args()
    ref_env = [tuple(e.split("=", 1)) for e in a.ref_env]
    c = bm.slice_config(layers=a.layers, experts=a.experts, vocab=8192, tiny=a.tiny)
    model = bm.build("ours-plain", c, bm.random_weights(c), a.dtype)
    base = model.make_cache(mla_bits=a.mla_bits)
    base.reserve(a.depth + 2 * a.steps + 64)
    bm.prefill_chunk("ours", model, mx.array([list(range(1, 65))]), base)
    bm.fill_synthetic("ours", model, base, a.depth)
    ref, ref_toks = run(model, base.copy(), a.steps, bool(ref_env), ref_env)
    got, got_toks = run(model, base.copy(), a.steps, True, [(n, "") for n, _ in ref_env])
    n_compiled = sum(bool(getattr(layer.__dict__.get("_compiled"), "fns", None)) for layer in model.layers)
    if n_compiled != len(model.layers):
        print(f"only {n_compiled} of {len(model.layers)} layers ran compiled")
        return 1
    pieces = [sorted({k[0] if isinstance(k, tuple) else k for k in layer.__dict__["_compiled"].fns})
              for layer in model.layers]
    print("compiled pieces by layer:", pieces)
    worst = max(float(mx.abs(r - g).max() / mx.abs(r).max()) for r, g in zip(ref, got))
    same = sum(x == y for x, y in zip(ref_toks, got_toks))
    what = "against " + ", ".join(a.ref_env) if ref_env else "vs plain"
    print(f"compiled {what} decode, {a.dtype}, {a.experts} experts, depth {a.depth}, {a.steps} steps, "
          f"MLA cache bits {a.mla_bits or 'full'}, on "
          f"{mx.default_device()}: max rel diff of logits {worst:.2e}, same token {same}/{a.steps}")
    return 0 if worst < (1e-5 if a.dtype == "fp32" else 3e-2) else 1


if __name__ == "__main__":
    sys.exit(main())
