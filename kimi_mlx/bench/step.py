"""One decode step of the slice model, part by part: where the per-token time goes.

    python -m kimi_mlx.bench step --depth 4K,128K --dtypes bf16 --layers 5 --experts 256

The slice is `bench model`'s (same builders, same random weights); the cache is brought to each
depth like bench model's synthetic-depth path (a short real prefill, then random MLA rows). Each
part runs alone on inputs captured from a real step and already evaluated, evaluated on its own
(median and min-max of --repeats, after warm-up): the embedding, each layer's attention (input
norm + KDA or MLA, with its cache write, + residual) and MLP/MoE (norm + MLP + residual), the
final norm + lm_head, sampling (log-softmax + kimi_mlx.sampling, as generate does), and each MLA
layer's cache append on its own. Then the whole step (ours and mlx-lm, greedy, as bench model
times decode), the time to build the step's lazy graph in Python without evaluating it, and the
graph's primitive count (an upper bound on kernel launches: views cost none). The sum of the parts
minus the whole step is roughly what the per-part syncs cost; whole step minus graph build is
the device time not hidden behind Python.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from . import time_runs
from . import model as mb


def _layer_inputs(model, tok, cache):
    """Run one step eagerly on a copy of the cache; returns (embedding, [(layer input, post-attention
    hidden)], final hidden before the norm), all evaluated."""
    inner = model.model
    c = cache.copy()
    x = inner.embed_tokens(tok)
    emb, per_layer = x, []
    for layer, lc in zip(inner.layers, c):
        h = x + layer.self_attn(layer.input_layernorm(x), lc)
        per_layer.append((x, h))
        x = h + layer.mlp(layer.post_attention_layernorm(h))
    mx.eval(emb, per_layer, x)
    return emb, per_layer, x


class ZeroKernel:
    """Stands in for a custom kernel (metal_kernels._kernel's product) in the scripts that count or
    time a step's host side: zeros of its output shapes, which depend on its inputs so that what
    feeds a kernel stays in the graph."""

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **kw):
        return mx.depends([mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)], list(inputs))


def _graph_ops(outputs) -> Counter:
    """Primitives in the lazy graph of `outputs` (from MLX's DOT export), by name."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.dot")
        mx.export_to_dot(path, *outputs)
        text = Path(path).read_text()
    return Counter(re.findall(r'label ="([^"]+)", shape=rectangle', text))


def breakdown(model, cache, tok, sampler, reps: int, warmup: int, report) -> list[dict]:
    """Time every part of one decode step of ours; report(row) is called as each is measured."""
    from ..cache import KimiCache

    inner = model.model
    rows = []

    def part(name, kind, f, layer=None, finish=None):
        try:
            t = time_runs(f, reps, warmup, finish=finish)
            r = {"part": name, "kind": kind, "layer": layer, **t.ms()}
        except Exception as e:
            r = {"part": name, "kind": kind, "layer": layer, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(r)
        report(r)

    emb, per_layer, x_last = _layer_inputs(model, tok, cache)
    part("embedding", "embedding", lambda: inner.embed_tokens(tok))
    for i, (layer, (x, h)) in enumerate(zip(inner.layers, per_layer)):
        lc = KimiCache([cache[i].copy()])  # appended to by every run (depth + a few rows): no effect on cache

        def attn(layer=layer, x=x, lc=lc):
            return x + layer.self_attn(layer.input_layernorm(x), lc[0])

        def with_cache(out, lc=lc):  # the step writes the cache too: evaluate it like a step does
            mx.eval(out)
            lc.eval()

        part(f"L{i} attention ({'MLA' if layer.is_mla else 'KDA'})", "mla" if layer.is_mla else "kda",
             attn, i, finish=with_cache)
        moe = type(layer.mlp).__name__
        part(f"L{i} {'MoE' if 'MoE' in moe else 'MLP'} ({moe})", "moe" if "MoE" in moe else "mlp",
             lambda layer=layer, h=h: h + layer.mlp(layer.post_attention_layernorm(h)), i)
    part("final norm + lm_head", "head", lambda: mb.lm_head(model, inner.norm(x_last)[:, -1]))
    logits = mb.lm_head(model, inner.norm(x_last)[:, -1])
    mx.eval(logits)
    part("sampling", "sampling", lambda: sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)))
    for i, layer in enumerate(inner.layers):
        if not layer.is_mla:
            continue  # KDA's state is written by its kernel: part of its attention above
        lc = KimiCache([cache[i].copy()])
        row = mx.random.normal((1, 1, model.config.kv_lora_rank + model.config.qk_rope_head_dim)).astype(emb.dtype)
        mx.eval(row)
        part(f"L{i} MLA cache append", "cache", lambda lc=lc, row=row: lc[0].append(row), i,
             finish=lambda _, lc=lc: lc.eval())
    return rows


def _step_outputs(impl: str, cache, y) -> list:
    """What a step must evaluate: the token and the cache writes that don't feed it (KDA states)."""
    from mlx.utils import tree_flatten

    if impl.startswith("ours"):
        return [y] + [a for c in cache if getattr(c, "kind", None) == "kda" for a in c.arrays().values()]
    return [y] + [a for _, a in tree_flatten([c.state for c in cache]) if isinstance(a, mx.array)]


def step_graph(impl: str, model, cache, tok) -> dict:
    """Python time to build one greedy step's lazy graph (not evaluated while timed), and the
    primitives in it. Each built step is evaluated before the next: the cache advances a token."""
    pending = []

    def build():
        y = mx.argmax(mb._logits_last(impl, model, tok, cache), axis=-1)
        pending.append(y)
        return y

    def flush():
        if pending:
            mx.eval(_step_outputs(impl, cache, pending.pop()))

    t = time_runs(build, reps=5, warmup=1, finish=mb._done, prepare=flush)
    flush()
    ops = _graph_ops(_step_outputs(impl, cache, build()))
    flush()
    return {"build_ms_median": t.median * 1e3, "build_ms_min": t.min * 1e3, "build_ms_max": t.max * 1e3,
            "primitives": sum(ops.values()), "top_primitives": dict(ops.most_common(12))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", default="4K,128K", help="cache depths, e.g. 4K,128K")
    ap.add_argument("--dtypes", default="bf16", help=f"comma list of {','.join(mb.DTYPES)}")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192, help="8192 like bench model (the real one: 163840)")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (smoke tests)")
    ap.add_argument("--impls", default="ours,mlx-lm", help="ours is broken down; mlx-lm: whole step only")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each part before its timed ones")
    ap.add_argument("--warmup-seconds", type=float, default=2.0,
                    help="decode steps for this long after each model's warm-up prefill (see model.warm_up)")
    ap.add_argument("--short-tokens", type=int, default=64, help="the real prefill before the synthetic rows")
    ap.add_argument("--step", type=int, default=2048, help="prefill chunk (the warm-up's too, on a GPU)")
    ap.add_argument("--temp", type=float, default=0.0, help="sampler of the sampling part (generate's options)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--min-p", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="out/bench_step.json")
    a = ap.parse_args(argv)

    from ..sampling import make_sampler

    depths = mb.parse_lengths(a.depth)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    for i in impls:
        if i not in ("ours", "mlx-lm"):
            ap.error(f"unknown impl {i!r} (ours, mlx-lm)")
    sampler = make_sampler(a.temp, a.top_p, a.top_k, a.min_p, a.seed)
    c = mb.slice_config(a.layers, a.experts, a.vocab, a.tiny)
    info = mb.machine_info()
    print(f"device {info['device']}, mlx {info.get('mlx')}, mlx-lm {info.get('mlx-lm')}; slice: {a.layers} layers "
          f"(MLA at {[i - 1 for i in c['linear_attn_config']['full_attn_layers']]}), {a.experts} experts", flush=True)
    base = mb.random_weights(c, a.seed)
    out = {"machine": info, "config": c, "args": vars(a), "results": []}
    path = Path(a.json)

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    def report(r):
        msg = r.get("error") or f"{r['ms_median']:9.3f} ms  [{r['ms_min']:.3f}-{r['ms_max']:.3f}]"
        print(f"    {r['part']:34s} {msg}", flush=True)

    chunk = mb.warmup_chunk(a.step)
    for dt in dtypes:
        models = {}
        for impl in impls:
            try:
                models[impl] = mb.build(impl, c, base, dt)
                mb.warm_up(impl, models[impl], chunk, a.vocab, a.seed + 1, a.warmup_seconds)
            except Exception as e:  # mlx-lm can't run bf16 experts on the CPU
                out["results"].append({"dtype": dt, "impl": impl, "error": f"{type(e).__name__}: {e}"[:200]})
                print(f"  {dt} {impl}: {out['results'][-1]['error']}", flush=True)
                models.pop(impl, None)
        for depth in depths:
            res = {"dtype": dt, "depth": depth, "whole_step": {}, "graph": {}}
            print(f"  {dt} depth {mb.fmt_len(depth)}:", flush=True)
            for impl, model in models.items():
                try:
                    _, cache, tok = mb.prefill_one(impl, model, min(a.short_tokens, depth), a.step, a.vocab, a.seed,
                                                     reserve=depth + 256)
                    mb.fill_synthetic(impl, model, cache, depth, a.seed)
                    if impl == "ours":
                        res["parts"] = breakdown(model, cache, tok, sampler, a.repeats, a.warmup, report)
                    t = time_runs(lambda: mb.greedy_step(impl, model, cache, tok), a.repeats, a.warmup,
                                  finish=mb._done)
                    res["whole_step"][impl] = t.ms()
                    print(f"    {'whole step (' + impl + ')':34s} {t.fmt()}", flush=True)
                    res["graph"][impl] = g = step_graph(impl, model, cache, tok)
                    print(f"    {'graph build (' + impl + ', no eval)':34s} {g['build_ms_median']:9.3f} ms, "
                          f"{g['primitives']} primitives", flush=True)
                except Exception as e:
                    res.setdefault("errors", {})[impl] = f"{type(e).__name__}: {e}"[:200]
                    print(f"    {impl}: {res['errors'][impl]}", flush=True)
                finally:
                    cache = None
                    gc.collect()
                    mx.clear_cache()
            summarize(res)
            out["results"].append(res)
            save()
        del models
        gc.collect()
        mx.clear_cache()
    print_table(out["results"])
    print(f"wrote {path}")
    return 0


def summarize(res: dict) -> None:
    """Totals by kind, their sum, and ours / mlx-lm."""
    parts = [p for p in res.get("parts", []) if "ms_median" in p]
    by = Counter()
    for p in parts:
        by[p["kind"]] += p["ms_median"]
    res["by_kind_ms"] = dict(by)
    res["sum_of_parts_ms"] = sum(by.values())
    w = res["whole_step"]
    if "ours" in w and "mlx-lm" in w:
        res["ours_over_mlx_lm_time"] = w["ours"]["ms_median"] / w["mlx-lm"]["ms_median"]


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    for res in results:
        if "depth" not in res:
            continue
        t = Table(title=f"one decode step, {res['dtype']}, depth {mb.fmt_len(res['depth'])} (ms: median, min-max)")
        for col in ("part", "median", "min-max", "share of step"):
            t.add_column(col, justify="left" if col == "part" else "right")
        whole = res["whole_step"].get("ours", {}).get("ms_median")
        for p in res.get("parts", []):
            if "error" in p:
                t.add_row(p["part"], p["error"][:40], "", "")
                continue
            t.add_row(p["part"], f"{p['ms_median']:.3f}", f"{p['ms_min']:.3f}-{p['ms_max']:.3f}",
                      f"{p['ms_median'] / whole:.0%}" if whole else "-")
        for kind, ms in res.get("by_kind_ms", {}).items():
            t.add_row(f"[b]all {kind}", f"{ms:.3f}", "", f"{ms / whole:.0%}" if whole else "-")
        if res.get("parts"):
            t.add_row("[b]sum of parts", f"{res['sum_of_parts_ms']:.3f}", "", "")
        for impl, w in res["whole_step"].items():
            g = res["graph"].get(impl, {})
            t.add_row(f"[b]whole step ({impl})", f"{w['ms_median']:.3f}", f"{w['ms_min']:.3f}-{w['ms_max']:.3f}",
                      f"graph {g.get('build_ms_median', 0):.2f} ms, {g.get('primitives', '-')} ops")
        if "ours_over_mlx_lm_time" in res:
            t.add_row("[b]ours / mlx-lm (time)", f"{res['ours_over_mlx_lm_time']:.2f}x", "", "")
        Console(width=120).print(t)


if __name__ == "__main__":
    sys.exit(main())
