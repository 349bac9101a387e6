"""Slice-model benchmark: ours vs mlx-lm's `kimi_linear`, same weights, same process.

The slice has the real per-layer widths of Kimi-Linear-48B-A3B (hidden 2304, 32 KDA heads of
128, MLA 32 heads with kv_lora_rank 512, experts of width 1024 with 8 active + a shared one,
a dense first layer of 9216) but few layers and experts, and random weights. Both models get
the identical tensors (generated under the published names, then each implementation's own
sanitize). `bf16` is the published dtype; `q4` is 4-bit / group 64 made from the bf16 weights
(bf16 scales, like an mlx-lm conversion), the router at 8 bits, for both; `fp32` for reference.
Ours runs with the CPU fast path (`ops/cpu_fast.py`) when the device is the CPU; `ours-plain`
is ours without it.

    python -m kimi_mlx.bench model                       # quick: 1K,4K; q4 and bf16
    python -m kimi_mlx.bench model --lengths 1K,8K,32K --dtypes q4 --json docs/bench_model.json --plot-dir docs

Prefill runs in chunks of --step tokens (2048, mlx-lm's default too), evaluating the cache
after each chunk. Decode times --decode-tokens greedy steps at that depth (median), with the
implementations' steps interleaved so that load from other processes hits them alike. Peak
memory = the model's weights + the largest extra active memory during its prefill.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

# ours-plain: ours without the CPU fast path; mlx-lm+fast: mlx-lm with our CPU fast path swapped in
# (isolates what the model code does, e.g. attention memory, from the CPU matmul kernels)
IMPLS = ("ours", "ours-plain", "mlx-lm", "mlx-lm+fast")
DTYPES = ("fp32", "bf16", "q4")


def slice_config(layers: int = 4, experts: int = 16, vocab: int = 8192) -> dict:
    """Published-style config.json of the slice: MLA every 4th layer (as in the real model), the
    rest KDA, layer 0 dense."""
    mla = [i for i in range(1, layers + 1) if i % 4 == 0] or [layers]
    return {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
        "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": layers,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 72, "vocab_size": vocab,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mla_use_nope": True,
        "rope_theta": 10000.0, "rope_scaling": None, "num_experts": experts, "num_experts_per_token": 8,
        "num_shared_experts": 1, "moe_intermediate_size": 1024, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
        "routed_scaling_factor": 2.446, "num_expert_group": 1, "topk_group": 1, "use_grouped_topk": True,
        "num_nextn_predict_layers": 0, "model_max_length": 1048576, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
        "linear_attn_config": {"head_dim": 128, "num_heads": 32, "short_conv_kernel_size": 4,
                               "full_attn_layers": mla,
                               "kda_layers": [i for i in range(1, layers + 1) if i not in mla]},
    }


def random_weights(c: dict, seed: int = 0) -> dict[str, mx.array]:
    """fp32 tensors under the published names. Linear weights uniform with variance 1/in (output
    projections halved) so the residual stream stays O(1) through the layers. numpy generates them:
    several times faster than mx.random on the CPU."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mx.random.seed(seed)

    def uniform(shape, std):
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= np.float32(std * 2 * math.sqrt(3.0))
        return mx.array(x)

    d, P = c["hidden_size"], c["linear_attn_config"]["num_heads"] * c["linear_attn_config"]["head_dim"]
    H, K = c["linear_attn_config"]["num_heads"], c["linear_attn_config"]["head_dim"]
    Hm, nope, rope, vd, rank = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                c["v_head_dim"], c["kv_lora_rank"])
    F, Fd, E = c["moe_intermediate_size"], c["intermediate_size"], c["num_experts"]
    mla = {i - 1 for i in c["linear_attn_config"]["full_attn_layers"]}
    w: dict[str, mx.array] = {}

    def lin(name, out, inp, gain=1.0):
        w[name] = uniform((out, inp), gain / math.sqrt(inp))

    w["model.embed_tokens.weight"] = uniform((c["vocab_size"], d), 1.0)
    w["model.norm.weight"] = mx.ones((d,))
    lin("lm_head.weight", c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = mx.ones((d,))
        w[p + "post_attention_layernorm.weight"] = mx.ones((d,))
        a = p + "self_attn."
        if i in mla:
            lin(a + "q_proj.weight", Hm * (nope + rope), d)
            lin(a + "kv_a_proj_with_mqa.weight", rank + rope, d)
            w[a + "kv_a_layernorm.weight"] = mx.ones((rank,))
            lin(a + "kv_b_proj.weight", Hm * (nope + vd), rank)
            lin(a + "o_proj.weight", d, Hm * vd, 0.5)
        else:
            for n in "qkv":
                lin(a + f"{n}_proj.weight", P, d)
                w[a + f"{n}_conv1d.weight"] = mx.random.normal((P, 1, 4)) * 0.5
            lin(a + "f_a_proj.weight", K, d)
            lin(a + "f_b_proj.weight", P, K, 0.5)
            w[a + "dt_bias"] = mx.random.normal((P,)) * 0.5 - 2.0  # mild decays, like trained models
            w[a + "A_log"] = mx.log(mx.random.uniform(1.0, 16.0, (1, 1, H, 1)))
            lin(a + "b_proj.weight", H, d)
            lin(a + "g_a_proj.weight", K, d)
            lin(a + "g_b_proj.weight", P, K)
            w[a + "o_norm.weight"] = mx.ones((K,))
            lin(a + "o_proj.weight", d, P, 0.5)
        if i < c["first_k_dense_replace"]:
            m = p + "mlp."
            lin(m + "gate_proj.weight", Fd, d)
            lin(m + "up_proj.weight", Fd, d)
            lin(m + "down_proj.weight", d, Fd, 0.5)
        else:
            m = p + "block_sparse_moe."
            lin(m + "gate.weight", E, d)
            w[m + "gate.e_score_correction_bias"] = mx.zeros((E,))
            for e in range(E):
                lin(m + f"experts.{e}.w1.weight", F, d)
                lin(m + f"experts.{e}.w3.weight", F, d)
                lin(m + f"experts.{e}.w2.weight", d, F, 0.5)
            lin(m + "shared_experts.gate_proj.weight", F, d)
            lin(m + "shared_experts.up_proj.weight", F, d)
            lin(m + "shared_experts.down_proj.weight", d, F, 0.5)
        mx.eval(w)
    return w


_FP32_NAMES = ("e_score_correction_bias", "A_log", "dt_bias")


def _cast(weights: dict, dtype) -> dict:
    return {k: (v if k.endswith(_FP32_NAMES) else v.astype(dtype)) for k, v in weights.items()}


def _quant_predicate(path: str, m: nn.Module):
    """Same rule for both implementations: 4-bit / group 64 where the input width divides, the
    router 8-bit (mlx-lm's own choice), embeddings left dense."""
    if not hasattr(m, "to_quantized") or isinstance(m, nn.Embedding):
        return False
    if m.weight.shape[-1] % 64:
        return False
    if path.endswith("mlp.gate"):
        return {"group_size": 64, "bits": 8}
    return True


def _quantize(model: nn.Module) -> None:
    nn.quantize(model, group_size=64, bits=4, class_predicate=_quant_predicate)


def build(impl: str, c: dict, weights: dict, dtype: str) -> nn.Module:
    # q4 starts from bf16 like a conversion of the published bf16 checkpoint (bf16 scales)
    wdt = mx.float32 if dtype == "fp32" else mx.bfloat16
    weights = _cast(weights, wdt) if wdt != mx.float32 else dict(weights)
    if impl.startswith("ours"):
        from ..config import ModelConfig
        from ..weights import build_model, load_weights_into, sanitize

        cfg = ModelConfig.from_dict(c)
        w, src = sanitize(weights, cfg)
        model = build_model(cfg)
        load_weights_into(model, w, src, Path("<slice>"))
    else:
        from mlx_lm.models.kimi_linear import Model, ModelArgs

        model = Model(ModelArgs.from_dict(c))
        model.load_weights(list(model.sanitize(weights).items()))
    if dtype == "q4":
        _quantize(model)
    mx.eval(model.parameters())
    model.eval()
    if impl in ("ours", "mlx-lm+fast"):
        from ..ops.cpu_fast import enable_cpu_fast_path

        enable_cpu_fast_path(model)  # no-op off the CPU
    return model


def _make_cache(impl: str, model):
    return model.make_cache()


def _eval_cache(impl: str, cache) -> None:
    if impl.startswith("ours"):
        cache.eval()
    else:
        mx.eval([c.state for c in cache])


def _forward_hidden(impl: str, model, chunk, cache):
    # both: hidden states only (no [T, vocab] logits), like session.prefill and mlx-lm's prefill
    return model.model(chunk, cache)


def _logits_last(impl: str, model, tok, cache):
    if impl.startswith("ours"):
        return model(tok, cache=cache, last_n=1)[:, -1]
    return model(tok, cache=cache)[:, -1]


def prefill_one(impl: str, model, n: int, step: int, vocab: int, seed: int = 0):
    """Prefill n random tokens in chunks; returns (stats, cache, next token). Peak memory is the
    model's own weights plus the largest extra memory during this prefill."""
    ids = mx.random.randint(0, vocab, (1, n), key=mx.random.key(seed))
    mx.eval(ids)
    cache = _make_cache(impl, model)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    for s in range(0, n - 1, step):  # the last token goes through the logits path
        _forward_hidden(impl, model, ids[:, s:min(s + step, n - 1)], cache)
        _eval_cache(impl, cache)
        mx.clear_cache()
    logits = _logits_last(impl, model, ids[:, n - 1:], cache)
    tok = mx.argmax(logits, axis=-1)[:, None]
    mx.eval(tok, logits)
    _eval_cache(impl, cache)
    t = time.perf_counter() - t0
    extra = mx.get_peak_memory() - base
    stats = {"prefill_s": t, "prefill_tok_s": n / t, "peak_extra_bytes": int(extra),
             "peak_mem_bytes": int(extra + weights_bytes(model)), "finite": bool(mx.isfinite(logits).all().item())}
    return stats, cache, tok


def decode_step(impl: str, model, cache, tok):
    """One greedy decode step; returns (next token, seconds)."""
    t = time.perf_counter()
    logits = _logits_last(impl, model, tok, cache)
    tok = mx.argmax(logits, axis=-1)[:, None]
    mx.eval(tok)
    _eval_cache(impl, cache)
    return tok, time.perf_counter() - t


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def run_length(impl: str, model, n: int, step: int, decode_tokens: int, vocab: int, seed: int = 0) -> dict:
    """Prefill then decode_tokens steps (after one warm-up step), one implementation alone."""
    stats, cache, tok = prefill_one(impl, model, n, step, vocab, seed)
    times = []
    for i in range(decode_tokens + 1):
        tok, dt = decode_step(impl, model, cache, tok)
        if i:
            times.append(dt)
    med = _median(times)
    stats.update({"decode_tok_s": 1 / med if med else None, "decode_ms_median": med * 1e3 if med else None})
    return stats


# ---------------------------------------------------------------------------
# profile: where the time goes (evaluates after every wrapped call, so it breaks fusion a bit)
# ---------------------------------------------------------------------------
_PROFILED_FUNCS = {
    "ours": [("kimi_mlx.model.kda", "kda"), ("kimi_mlx.model.kda", "causal_short_conv"),
             ("kimi_mlx.model.mla", "latent_attention"), ("kimi_mlx.model.mla", "linear_weight"),
             ("kimi_mlx.model.moe", "route")],
    "mlx-lm": [("mlx_lm.models.kimi_linear", "gated_delta_update"),
               ("mlx_lm.models.kimi_linear", "scaled_dot_product_attention"),
               ("mlx_lm.models.kimi_linear", "_group_expert_select")],
}


def profile(impl: str, model, depth: int, tokens: int, step: int, vocab: int) -> dict[str, float]:
    """Seconds per module class / op for one forward of `tokens` tokens at `depth` (inclusive times:
    a layer includes its attention and MLP)."""
    import importlib

    times: dict[str, float] = {}
    calls: dict[str, int] = {}

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            mx.eval(out)
            times[name] = times.get(name, 0.0) + time.perf_counter() - t
            calls[name] = calls.get(name, 0) + 1
            return out
        return run

    ids = mx.random.randint(0, vocab, (1, depth + tokens), key=mx.random.key(3))
    cache = _make_cache(impl, model)
    for s in range(0, depth, step):
        _forward_hidden(impl, model, ids[:, s:min(s + step, depth)], cache)
        _eval_cache(impl, cache)
    # wrap: module classes (swap to a timed subclass) and module-level functions
    swapped, patched, subclasses = [], [], {}
    for _, m in model.named_modules():
        cls = type(m)
        if cls.__name__ in ("Model", "KimiLinearModel") or not cls.__module__.startswith(("kimi_mlx", "mlx_lm", "mlx.nn")):
            continue
        if cls not in subclasses:
            subclasses[cls] = type(cls.__name__, (cls,), {"__call__": timed(cls.__name__, cls.__call__)})
        swapped.append((m, cls))
        m.__class__ = subclasses[cls]
    for mod, fname in _PROFILED_FUNCS["ours" if impl.startswith("ours") else "mlx-lm"]:
        try:
            module = importlib.import_module(mod)
            fn = getattr(module, fname)
        except (ImportError, AttributeError):
            continue
        patched.append((module, fname, fn))
        setattr(module, fname, timed(f"{fname}()", fn))
    try:
        t = time.perf_counter()
        if tokens > 1:
            _forward_hidden(impl, model, ids[:, depth:depth + tokens], cache)
            _eval_cache(impl, cache)
        else:
            mx.eval(_logits_last(impl, model, ids[:, depth:depth + 1], cache))
            _eval_cache(impl, cache)
        times["total"] = time.perf_counter() - t
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        for module, fname, fn in patched:
            setattr(module, fname, fn)
    return {k: round(v, 5) for k, v in sorted(times.items(), key=lambda kv: -kv[1])} | \
        {"_calls": calls}


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _mlx_lm_attention_bytes(n: int, step: int, heads: int = 32) -> int:
    # mlx-lm's prefill materialises an fp32 [heads, chunk, context] score mask and the scores
    return 3 * heads * min(step, n) * n * 4


def machine_info() -> dict:
    from .. import _blas

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import importlib.metadata as md

        versions = {p: md.version(p) for p in ("mlx", "mlx-lm")}
    except Exception:
        versions = {}
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "device": str(mx.default_device()), "blas": _blas.blas_info(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None, **versions}


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def parse_lengths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        if part:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
    return out


def fmt_len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def print_table(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Slice model (Kimi-Linear-48B-A3B widths)")
    for col in ("dtype", "impl", "context", "prefill tok/s", "decode tok/s", "peak mem", "note"):
        t.add_column(col, justify="right" if col not in ("dtype", "impl", "note") else "left")
    for r in results:
        t.add_row(r["dtype"], r["impl"], fmt_len(r["length"]),
                  f"{r['prefill_tok_s']:.1f}" if r.get("prefill_tok_s") else "-",
                  f"{r['decode_tok_s']:.2f}" if r.get("decode_tok_s") else "-",
                  f"{r['peak_mem_bytes'] / 2**30:.2f} GiB" if r.get("peak_mem_bytes") else "-",
                  (r.get("error") or ("" if r.get("finite", True) else "non-finite logits"))[:48])
    Console().print(t)
    # ratios: ours / each mlx-lm variant
    by = {(r["dtype"], r["impl"], r["length"]): r for r in results}
    rows = []
    for (dt, impl, n), r in by.items():
        for base in ("mlx-lm", "mlx-lm+fast"):
            o = by.get((dt, base, n))
            if impl == "ours" and o and o.get("prefill_tok_s") and r.get("prefill_tok_s"):
                rows.append((dt, base, fmt_len(n), r["prefill_tok_s"] / o["prefill_tok_s"],
                             (r.get("decode_tok_s") or 0) / (o.get("decode_tok_s") or math.inf),
                             r["peak_mem_bytes"] / o["peak_mem_bytes"]))
    if rows:
        t2 = Table(title="ours / baseline")
        for col in ("dtype", "baseline", "context", "prefill ×", "decode ×", "peak mem ratio"):
            t2.add_column(col, justify="right")
        for dt, base, n, p, d, m in rows:
            t2.add_row(dt, base, n, f"{p:.1f}", f"{d:.2f}", f"{m:.2f}")
        Console().print(t2)


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


def plot(results: list[dict], plot_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dt in sorted({r["dtype"] for r in results}):
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for impl in IMPLS:
            rs = sorted((r for r in results if r["dtype"] == dt and r["impl"] == impl and r.get("prefill_tok_s")),
                        key=lambda r: r["length"])
            if not rs:
                continue
            xs = [r["length"] for r in rs]
            axes[0].plot(xs, [r["prefill_tok_s"] for r in rs], "o-", label=impl)
            axes[1].plot(xs, [r["decode_tok_s"] for r in rs], "o-", label=impl)
            axes[2].plot(xs, [r["peak_mem_bytes"] / 2**30 for r in rs], "o-", label=impl)
        for ax, title in zip(axes, ("prefill tokens/s", "decode tokens/s", "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend()
        axes[0].set_yscale("log")
        fig.suptitle(f"Kimi-Linear slice model, {dt}, {mx.default_device()}")
        fig.tight_layout()
        path = plot_dir / f"bench_model_{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1K,4K", help="context lengths, e.g. 1K,8K,32K")
    ap.add_argument("--dtypes", default="q4,bf16", help=f"comma list of {','.join(DTYPES)}")
    ap.add_argument("--impls", default="ours,mlx-lm", help=f"comma list of {','.join(IMPLS)}")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--step", type=int, default=2048, help="prefill chunk (tokens)")
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-mlx-lm-length", type=int, default=None,
                    help="skip mlx-lm above this context (it is slow on the CPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also time each module class / op for one prefill chunk and one decode step")
    ap.add_argument("--profile-tokens", type=int, default=512)
    ap.add_argument("--json", default="out/bench_model.json")
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
    c = slice_config(a.layers, a.experts, a.vocab)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, device {info['device']}, "
          f"BLAS: {info['blas'].get('source')} {info['blas'].get('path') or ''}", flush=True)
    t = time.perf_counter()
    base = random_weights(c, a.seed)
    print(f"random weights: {sum(v.size for v in base.values()) / 1e6:.0f}M parameters "
          f"({time.perf_counter() - t:.1f}s)", flush=True)
    results, profiles = [], []
    path = Path(a.json)
    from .roofline import model_costs

    def save():
        out = {"machine": info, "config": c, "args": vars(a), "results": results}
        if profiles:
            out["profiles"] = profiles
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))

    for dt in dtypes:
        models, failed = {}, {}
        for impl in impls:  # all implementations side by side, so decode steps can interleave
            try:
                models[impl] = build(impl, c, base, dt)
                run_length(impl, models[impl], 16, a.step, 1, a.vocab, a.seed + 1)  # warm-up (compiles)
            except Exception as e:  # report, keep going (mlx-lm can't run bf16 experts on the CPU)
                failed[impl] = f"{type(e).__name__}: {e}"[:200]
                models.pop(impl, None)
                print(f"  {dt:5s} {impl:10s}: {failed[impl]}", flush=True)
        gc.collect()
        mx.clear_cache()
        for n in lengths:
            row, live = {}, {}
            for impl in impls:
                r = {"dtype": dt, "impl": impl, "length": n, **model_costs(c, dt, n)}
                row[impl] = r
                if impl in failed:
                    r["error"] = failed[impl]
                    continue
                r["weights_bytes"] = wb = weights_bytes(models[impl])
                avail = _available_bytes()
                need = _mlx_lm_attention_bytes(n, a.step) if impl.startswith("mlx-lm") else 0
                if impl == "mlx-lm" and a.max_mlx_lm_length and n > a.max_mlx_lm_length:
                    r["error"] = f"skipped (> --max-mlx-lm-length {a.max_mlx_lm_length})"
                elif avail is not None and need > 0.8 * avail:
                    r["error"] = f"skipped: its prefill needs ~{need / 2**30:.0f} GiB, {avail / 2**30:.0f} GiB free"
                else:
                    try:
                        stats, cache, tok = prefill_one(impl, models[impl], n, a.step, a.vocab, a.seed)
                        r.update(stats)
                        live[impl] = [cache, tok, []]
                    except Exception as e:
                        r["error"] = f"{type(e).__name__}: {e}"[:200]
            # decode, interleaved: each round runs one step of every implementation, so load from
            # other processes hits all of them alike; the first round is a warm-up
            for i in range(a.decode_tokens + 1):
                for impl, st in live.items():
                    try:
                        st[1], dt_s = decode_step(impl, models[impl], st[0], st[1])
                        if i:
                            st[2].append(dt_s)
                    except Exception as e:
                        row[impl]["error"] = f"decode: {type(e).__name__}: {e}"[:200]
            for impl, st in live.items():
                med = _median(st[2])
                row[impl].update({"decode_tok_s": 1 / med if med else None,
                                  "decode_ms_median": med * 1e3 if med else None,
                                  "decode_ms_all": [round(x * 1e3, 2) for x in st[2]]})
            del live
            gc.collect()
            mx.clear_cache()
            for impl in impls:
                r = row[impl]
                results.append(r)
                print(f"  {dt:5s} {impl:10s} {fmt_len(n):>5s}: "
                      + (f"prefill {r['prefill_tok_s']:8.1f} tok/s  decode {r['decode_tok_s'] or 0:6.2f} tok/s  "
                         f"peak {r['peak_mem_bytes'] / 2**30:.2f} GiB" if r.get("prefill_tok_s") else r["error"]),
                      flush=True)
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
        del models
        gc.collect()
        mx.clear_cache()
    print_table(results)
    save()
    print(f"wrote {path}")
    if not a.no_plot:
        for p in plot(results, Path(a.plot_dir) if a.plot_dir else path.parent):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
