"""Slice-model benchmark: ours vs mlx-lm's `kimi_linear`, same weights, same process.

The slice has the real per-layer widths of Kimi-Linear-48B-A3B (hidden 2304, 32 KDA heads of
128, MLA 32 heads with kv_lora_rank 512, experts of width 1024 with 8 active + a shared one,
a dense first layer of 9216) but few layers (default 5: KDA, KDA, KDA, MLA, KDA, as the real
model starts) and experts, and random weights. Both models get
the identical tensors (generated under the published names, then each implementation's own
sanitize). `bf16` is the published dtype; `q4` is 4-bit / group 64 made from the bf16 weights
(bf16 scales, like an mlx-lm conversion), the router at 8 bits, for both; `fp32` for reference.
Ours runs with the CPU fast path (`ops/cpu_fast.py`) when the device is the CPU; `ours-plain`
is ours without it.

    python -m kimi_mlx.bench model                       # quick: 1K,4K; q4 and bf16
    python -m kimi_mlx.bench model --lengths 1K,8K,32K --dtypes q4 --json docs/bench_model.json --plot-dir docs

Prefill runs in chunks of --step tokens (2048, mlx-lm's default too), evaluating each chunk's
last-position logits and the cache (so every layer runs). Before anything is timed, every model
runs a two-chunk prefill and two decode steps (kernel compiles, the initial-state variants). Decode times --decode-tokens greedy steps at that depth, with the
implementations' steps interleaved so that load from other processes hits them alike, then a pipelined
block of as many per implementation; --decode-rounds (3) repeats both, and each rate is the median over
rounds (the min-max is printed beside it). Peak
memory = the model's weights + the largest extra active memory during its prefill.

Before timing, both models are built in fp32 and their logits compared (`checks.same_weights` in the
JSON: the same weights give ~1e-6 relative); on MLX-CUDA with 16 experts (check_plan says why). Where a full prefill is too slow (--max-prefill impl=N) or would
not fit in memory, decode is measured on a synthetic cache of that depth (a short real prefill, then
random latent rows: decode cost doesn't depend on their values) and the prefill is estimated
(`estimate()`: a real --probe-tokens chunk timed at the full depth, a fit through measured lengths, or
for plain mlx-lm its measured per-token excess over mlx-lm+fast); estimates are marked `~`.
`--tiny` shrinks the widths for smoke tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import time_runs
from .common import _available_bytes, fmt_len, machine_info, model_costs, parse_lengths  # noqa: F401
from .estimate import _SIBLING, _mlx_lm_attention_bytes, estimate  # noqa: F401
# the build and run steps live in bench.slice and bench.run; their names stay reachable from here,
# where step/roofline/plots and the tests know them
from .run import (_cache_bytes, _done, _eval_cache, _forward_hidden, _logits_last, _make_cache,  # noqa: F401
                  _median, decode_step, fill_synthetic, greedy_step, lm_head, pipelined_decode, prefill_chunk,
                  prefill_one, profile, run_length, warm_up, warmup_chunk, weights_bytes)
from .slice import (DTYPES, IMPLS, _quantize, agreement, build, check_plan, random_weights,  # noqa: F401
                    same_weights_check, slice_config)

def _fmt_prefill(r: dict) -> str:
    for key, pre in (("prefill_tok_s", ""), ("prefill_tok_s_est", "~")):
        x = r.get(key)
        if x:
            return f"{pre}{x:.2f}" if x < 10 else f"{pre}{x:.1f}"
    return "-"


def _fmt_mem(r: dict) -> str:
    if r.get("peak_mem_bytes"):
        return f"{r['peak_mem_bytes'] / 2**30:.2f} GiB"
    if r.get("peak_mem_bytes_est"):
        return f"~{r['peak_mem_bytes_est'] / 2**30:.2f} GiB"
    return "-"


def _note(r: dict) -> str:
    err = r.get("error") or ""
    if "GatherMM" in err and "float32" in err:
        return "fails: CPU gather_mm is fp32-only"
    if err:
        return err[:60]
    notes = []
    if r.get("prefill_skipped"):
        if "GiB" in r["prefill_skipped"]:
            notes.append("prefill doesn't fit in RAM (default step)")
        else:
            notes.append("prefill est." if r.get("prefill_tok_s_est") else "prefill skipped")
    if r.get("decode_depth") == "synthetic":
        notes.append("decode on synthetic cache")
    if not r.get("finite", True):
        notes.append("non-finite logits")
    return "; ".join(notes)


def ratio_rows(results: list[dict]) -> list[dict]:
    """ours / each mlx-lm variant, same dtype and length (estimates where one side was estimated)."""
    by = {(r["dtype"], r["impl"], r["length"]): r for r in results}
    rows = []
    for (dt, impl, n), r in by.items():
        if impl != "ours":
            continue
        for base in ("mlx-lm", "mlx-lm+fast"):
            o = by.get((dt, base, n))
            if not o or o.get("error"):
                continue
            rp, op = r.get("prefill_tok_s") or r.get("prefill_tok_s_est"), o.get("prefill_tok_s") or o.get("prefill_tok_s_est")
            rm, om = r.get("peak_mem_bytes") or r.get("peak_mem_bytes_est"), o.get("peak_mem_bytes") or o.get("peak_mem_bytes_est")
            rows.append({"dtype": dt, "baseline": base, "length": n,
                         "prefill_x": rp / op if rp and op else None,
                         "prefill_estimated": not (r.get("prefill_tok_s") and o.get("prefill_tok_s")),
                         "decode_x": r["decode_tok_s"] / o["decode_tok_s"] if r.get("decode_tok_s") and o.get("decode_tok_s") else None,
                         "mem_ratio": rm / om if rm and om else None,
                         "mem_estimated": not (r.get("peak_mem_bytes") and o.get("peak_mem_bytes"))})
    return rows


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    t = Table(title="Slice model (Kimi-Linear-48B-A3B widths)   ~ = estimated")
    for col in ("dtype", "impl", "context", "prefill tok/s", "decode tok/s", "peak mem", "note"):
        t.add_column(col, justify="right" if col not in ("dtype", "impl", "note") else "left", no_wrap=True)
    for r in results:
        t.add_row(r["dtype"], r["impl"], fmt_len(r["length"]), _fmt_prefill(r),
                  f"{r['decode_tok_s']:.2f}" if r.get("decode_tok_s") else "-", _fmt_mem(r), _note(r))
    con.print(t)
    rows = ratio_rows(results)
    if rows:
        t2 = Table(title="ours / baseline   (~ = from an estimate)")
        for col in ("dtype", "baseline", "context", "prefill ×", "decode ×", "peak mem ratio"):
            t2.add_column(col, justify="right")
        for x in rows:
            t2.add_row(x["dtype"], x["baseline"], fmt_len(x["length"]),
                       ("~" if x["prefill_estimated"] else "") + (f"{x['prefill_x']:.1f}" if x["prefill_x"] else "-"),
                       f"{x['decode_x']:.2f}" if x["decode_x"] else "-",
                       ("~" if x["mem_estimated"] else "") + (f"{x['mem_ratio']:.2f}" if x["mem_ratio"] else "-"))
        con.print(t2)


def print_profile(p: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if "error" in p:
        print(f"profile {p['impl']} {p['dtype']}: {p['error']}")
        return
    t = Table(title=f"profile: {p['impl']} {p['dtype']} at depth {fmt_len(p['depth'])} (inclusive seconds)")
    for col in ("module / op", "prefill chunk", "decode step"):
        t.add_column(col, justify="left" if col.startswith("module") else "right")
    names = [k for k in p["prefill"] if not k.startswith("_")]
    names += [k for k in p["decode"] if not k.startswith("_") and k not in names]
    for k in names:
        t.add_row(k, f"{p['prefill'].get(k, 0):.3f}", f"{p['decode'].get(k, 0) * 1e3:.1f} ms")
    Console().print(t)


def plot(results: list[dict], plot_dir: Path, title: str | None = None) -> list[str]:
    """One PNG per dtype: prefill tok/s, decode tok/s and peak memory vs context length, one line per
    implementation; estimated points hollow on dashed lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = dict(zip(IMPLS, ("C0", "C2", "C3", "C1")))
    for dt in sorted({r["dtype"] for r in results}):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        for impl in IMPLS:
            rs = sorted((r for r in results if r["dtype"] == dt and r["impl"] == impl and not r.get("error")),
                        key=lambda r: r["length"])
            if not rs:
                continue
            col = colors[impl]
            for ax, meas, est in ((axes[0], "prefill_tok_s", "prefill_tok_s_est"), (axes[1], "decode_tok_s", None),
                                  (axes[2], "peak_mem_bytes", "peak_mem_bytes_est")):
                div = 2**30 if meas == "peak_mem_bytes" else 1
                pts = [(r["length"], r[meas] / div) for r in rs if r.get(meas)]
                est_pts = [(r["length"], r[est] / div) for r in rs if est and not r.get(meas) and r.get(est)]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=col, label=impl)
                if est_pts:
                    joined = sorted(pts[-1:] + est_pts)
                    ax.plot(*zip(*joined), "--", color=col)
                    ax.plot(*zip(*est_pts), "o", mfc="none", color=col, label=None if pts else f"{impl} (est.)")
        for ax, ttl in zip(axes, ("prefill tokens/s", "decode tokens/s at that depth", "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(ttl)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_yscale("log")
        fig.suptitle(title or f"Kimi-Linear slice model, {dt}, {mx.default_device()} (hollow/dashed: estimated)")
        fig.tight_layout()
        path = plot_dir / f"bench_model_{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _parse_limits(s: str | None) -> dict[str, int]:
    """'mlx-lm=1K,mlx-lm+fast=8K' -> {impl: max length}."""
    out = {}
    for part in (s or "").split(","):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = parse_lengths(v)[0]
    return out


def _at_least_one(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _spread(r: dict, key: str) -> str:
    """' [min-max]' over the decode rounds, when there were several."""
    xs = r.get(key) or []
    return f" [{min(xs):.1f}-{max(xs):.1f}]" if len(xs) > 1 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1K,4K", help="context lengths, e.g. 1K,8K,32K")
    ap.add_argument("--dtypes", default="q4,bf16", help=f"comma list of {','.join(DTYPES)}")
    ap.add_argument("--impls", default="ours,mlx-lm", help=f"comma list of {','.join(IMPLS)}")
    ap.add_argument("--layers", type=int, default=5, help="5: the MLA layer at index 3, as in the real model")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (smoke tests), not the real ones")
    ap.add_argument("--step", type=int, default=2048, help="prefill chunk (tokens)")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--decode-rounds", type=_at_least_one, default=3,
                    help="repeat the decode timing (steps, then pipelined) this many times; the median over rounds is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prefill", default=None,
                    help="skip the full prefill above a length per impl, e.g. 'mlx-lm=1K,mlx-lm+fast=8K': decode "
                         "is then measured on a synthetic cache of that depth and prefill is estimated")
    ap.add_argument("--max-mlx-lm-length", type=int, default=None, help="same as --max-prefill mlx-lm=N")
    ap.add_argument("--no-synthetic", action="store_true", help="skipped prefill: no synthetic-depth decode")
    ap.add_argument("--probe-tokens", type=int, default=1024,
                    help="skipped prefill (fast-path impls): time one chunk of this many tokens at the full depth "
                         "on the synthetic cache; prefill is then estimated from it (0: off)")
    ap.add_argument("--short-tokens", type=int, default=64,
                    help="skipped prefill: tokens of the short real prefill (timed, and through the sibling impl)")
    ap.add_argument("--no-check", action="store_true", help="skip the same-weights logits check")
    ap.add_argument("--check-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="dtype of the same-weights check; auto: fp32 (on MLX-CUDA with at most 16 experts: see check_plan)")
    ap.add_argument("--warmup-seconds", type=float, default=2.0,
                    help="decode steps for this long after the warm-up prefill, per impl and dtype")
    ap.add_argument("--warmup-chunk", type=int, default=None,
                    help="chunk of the warm-up prefill (two chunks, then two decode steps; default: --step on a "
                         "GPU, min(--step, 256) on the CPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also time each module class / op for one prefill chunk and one decode step")
    ap.add_argument("--profile-tokens", type=int, default=512)
    ap.add_argument("--json", default="out/bench_model.json")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing --json (rows with the same dtype/impl/length are replaced)")
    ap.add_argument("--plot-dir", default=None, help="write PNG plots here (default: next to the JSON)")
    ap.add_argument("--no-plot", action="store_true")
    a = ap.parse_args(argv)

    lengths = parse_lengths(a.lengths)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    impls = [i.strip() for i in a.impls.split(",") if i.strip()]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r}")
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown impl {i!r}")
    limits = _parse_limits(a.max_prefill)
    if a.max_mlx_lm_length:
        limits.setdefault("mlx-lm", a.max_mlx_lm_length)
    c = slice_config(a.layers, a.experts, a.vocab, a.tiny)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, device {info['device']}, "
          f"BLAS: {info['blas'].get('source')} {info['blas'].get('path') or ''}", flush=True)
    t = time.perf_counter()
    base = random_weights(c, a.seed)
    print(f"random weights: {sum(v.size for v in base.values()) / 1e6:.0f}M parameters "
          f"({time.perf_counter() - t:.1f}s)", flush=True)
    path = Path(a.json)
    old = json.loads(path.read_text()) if a.append and path.exists() else {}
    results, profiles, checks = [], [], dict(old.get("checks", {}))
    runs = list(old.get("runs", [])) + [{"args": vars(a), "machine": info}]

    def save():
        keys = {(r["dtype"], r["impl"], r["length"]) for r in results}
        allr = [r for r in old.get("results", []) if (r["dtype"], r["impl"], r["length"]) not in keys] + results
        allr.sort(key=lambda r: (DTYPES.index(r["dtype"]), r["length"], IMPLS.index(r["impl"])))
        estimate(allr)
        out = {"machine": info, "config": c, "args": vars(a), "runs": runs, "checks": checks, "results": allr}
        if profiles or old.get("profiles"):
            out["profiles"] = old.get("profiles", []) + profiles
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        return allr

    if not a.no_check and "ours" in impls and any(i.startswith("mlx-lm") for i in impls):
        checks["same_weights"] = same_weights_check(c, base, a.vocab, check_plan(a.experts, a.check_dtype), a.seed)
        gc.collect()
        mx.clear_cache()
    wchunk = a.warmup_chunk or warmup_chunk(a.step)
    for dt in dtypes:
        models, failed = {}, {}
        for impl in impls:  # all implementations side by side, so decode steps can interleave
            try:
                models[impl] = build(impl, c, base, dt)
                warm_up(impl, models[impl], wchunk, a.vocab, a.seed + 1, a.warmup_seconds)
            except Exception as e:  # report, keep going (mlx-lm can't run bf16 experts on the CPU)
                failed[impl] = f"{type(e).__name__}: {e}"[:200]
                models.pop(impl, None)
                print(f"  {dt:5s} {impl:10s}: {failed[impl]}", flush=True)
        for impl, m in models.items():
            print(f"  {dt:5s} {impl:10s}: CPU fast path {m.bench_fast_path or 'off'}", flush=True)
        if not a.no_check and len(models) > 1:
            checks[dt] = agreement(models, a.vocab)
            for impl, ch in checks[dt].items():
                print(f"  {dt:5s} {impl:10s}: logits vs {ch['vs']}: max |diff| {ch['max_abs_diff']:.2e} "
                      f"(rel {ch['rel_diff']:.1e}), argmax agree {ch['argmax_agree']:.0%}", flush=True)
        gc.collect()
        mx.clear_cache()
        synth = {}
        for n in lengths:
            row, live = {}, {}
            for impl in impls:
                r = {"dtype": dt, "impl": impl, "length": n, **model_costs(c, dt, n)}
                row[impl] = r
                if impl in failed:
                    r["error"] = failed[impl]
                    continue
                r["weights_bytes"] = weights_bytes(models[impl])
                r["step"] = a.step
                r["fast_path"] = models[impl].bench_fast_path
                avail = _available_bytes()
                need = _mlx_lm_attention_bytes(n, a.step, c["num_attention_heads"],
                                               4 if impl == "mlx-lm+fast" or dt == "fp32" else 2) \
                    if impl.startswith("mlx-lm") else 0
                if need:
                    r["attention_bytes_est"] = need
                skip = None
                if avail is not None and need > 0.8 * avail:  # the stronger reason first
                    skip = f"prefill skipped: it needs ~{need / 2**30:.0f} GiB, {avail / 2**30:.0f} GiB free"
                elif impl in limits and n > limits[impl]:
                    skip = f"prefill skipped (> {fmt_len(limits[impl])} for {impl}: too slow here)"
                try:
                    if skip:
                        r["prefill_skipped"] = skip
                        if a.no_synthetic:
                            continue
                        if impl not in synth:  # one short real prefill per impl, then synthetic rows
                            st, cache, tok = prefill_one(impl, models[impl], a.short_tokens, a.step, a.vocab, a.seed,
                                                         reserve=max(lengths) + 256)
                            short = {"tokens": a.short_tokens, "s": st["prefill_s"]}
                            sib = _SIBLING.get(impl)
                            if sib in models:  # the same short prefill through the sibling, for estimate()
                                short["sibling"] = sib
                                short["sibling_s"] = prefill_one(sib, models[sib], a.short_tokens, a.step, a.vocab,
                                                                 a.seed)[0]["prefill_s"]
                            synth[impl] = [cache, tok, short]
                        cache, tok, short = synth[impl]
                        r["short_prefill"] = short
                        N = a.probe_tokens
                        if N and impl not in _SIBLING and n > N:  # fast kernels only: plain ones take hours
                            pneed = _mlx_lm_attention_bytes(n, N, c["num_attention_heads"], 4) \
                                if impl.startswith("mlx-lm") else 0
                            if avail is None or pneed < 0.7 * avail:
                                # one real prefill chunk of N tokens at depth n - N on the synthetic cache
                                fill_synthetic(impl, models[impl], cache, n - N, a.seed)
                                ids = mx.random.randint(0, a.vocab, (1, N), key=mx.random.key(a.seed + 7))
                                mx.eval(ids)
                                gc.collect()
                                mx.clear_cache()
                                base_mem = mx.get_active_memory()
                                mx.reset_peak_memory()
                                probe_s = time_runs(lambda: prefill_chunk(impl, models[impl], ids, cache),
                                                    reps=1, warmup=0, finish=_done).times[0]
                                r["probe"] = {"tokens": N, "depth": n - N, "s": probe_s,
                                              "peak_extra_bytes": int(mx.get_peak_memory() - base_mem),
                                              "cache_bytes": _cache_bytes(cache)}
                                mx.clear_cache()
                            else:
                                r["probe"] = {"error": f"a {N}-token chunk needs ~{pneed / 2**30:.0f} GiB"}
                        fill_synthetic(impl, models[impl], cache, n, a.seed)
                        r["decode_depth"] = "synthetic"
                    else:
                        stats, cache, tok = prefill_one(impl, models[impl], n, a.step, a.vocab, a.seed)
                        r.update(stats)
                        r["decode_depth"] = "prefilled"
                    live[impl] = [cache, tok, [], []]  # cache, token, step times a round, pipelined rates
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {e}"[:200]
            # decode, interleaved: each iteration runs one step of every implementation, so load
            # from other processes hits all of them alike (the very first is a warm-up); then each
            # one's pipelined block. --decode-rounds repeats both and takes the median over rounds:
            # one run of a few dozen steps moves by 10-40 % on a GPU host.
            for rnd in range(a.decode_rounds):
                for impl, st in live.items():
                    st[2].append([])
                for i in range(a.decode_tokens + (rnd == 0)):
                    for impl, st in list(live.items()):
                        try:
                            st[1], dt_s = decode_step(impl, models[impl], st[0], st[1])
                            if i or rnd:
                                st[2][-1].append(dt_s)
                        except Exception as e:
                            row[impl]["error"] = f"decode: {type(e).__name__}: {e}"[:200]
                            live.pop(impl)
                if a.decode_tokens > 1:  # what generation sees: graph building overlaps the device
                    for impl, st in live.items():
                        if st[3] is None:
                            continue
                        try:
                            sec, st[1] = pipelined_decode(impl, models[impl], st[0], st[1], a.decode_tokens)
                            st[3].append(1 / sec)
                        except Exception as e:  # keeps its synced steps, as before rounds; no retry
                            row[impl]["error"] = f"pipelined decode: {type(e).__name__}: {e}"[:200]
                            st[3] = None
            for impl, st in live.items():
                steps = [t for ts in st[2] for t in ts]
                med = _median(steps)
                rates = [1 / _median(ts) for ts in st[2] if ts]
                # over rounds the true median (an even R averages the middle two), not _median's upper one
                row[impl].update({"decode_tok_s": statistics.median(rates) if rates else None,
                                  "decode_tok_s_rounds": [round(x, 2) for x in rates],
                                  "decode_ms_median": med * 1e3 if med else None,
                                  "decode_ms_all": [round(x * 1e3, 2) for x in steps]})
                if st[3]:
                    row[impl].update({"decode_pipelined_tok_s": statistics.median(st[3]),
                                      "decode_pipelined_tok_s_rounds": [round(x, 2) for x in st[3]]})
                if impl in synth:
                    synth[impl][1] = st[1]
            del live
            gc.collect()
            mx.clear_cache()
            for impl in impls:
                r = row[impl]
                results.append(r)
                msg = r.get("error") or ""
                if r.get("prefill_tok_s"):
                    msg = f"prefill {r['prefill_tok_s']:8.1f} tok/s  peak {r['peak_mem_bytes'] / 2**30:.2f} GiB"
                elif r.get("prefill_skipped"):
                    msg = r["prefill_skipped"]
                if r.get("decode_tok_s"):
                    msg += f"  decode {r['decode_tok_s']:6.2f} tok/s{_spread(r, 'decode_tok_s_rounds')} ({r['decode_depth']} depth)"
                if r.get("decode_pipelined_tok_s"):
                    msg += f", pipelined {r['decode_pipelined_tok_s']:6.2f} tok/s{_spread(r, 'decode_pipelined_tok_s_rounds')}"
                print(f"  {dt:5s} {impl:10s} {fmt_len(n):>5s}: {msg}", flush=True)
            save()
        if a.profile:
            for impl, model in models.items():
                try:
                    depth = lengths[0]
                    prof = {"prefill": profile(impl, model, depth, a.profile_tokens, a.step, a.vocab),
                            "decode": profile(impl, model, depth, 1, a.step, a.vocab)}
                except Exception as e:
                    prof = {"error": f"{type(e).__name__}: {e}"[:200]}
                profiles.append({"dtype": dt, "impl": impl, "depth": lengths[0], **prof})
                print_profile(profiles[-1])
            save()
        del models, synth
        gc.collect()
        mx.clear_cache()
    allr = save()
    print_table(allr)
    print(f"wrote {path}")
    if not a.no_plot:
        for p in plot(allr, Path(a.plot_dir) if a.plot_dir else path.parent):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
