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
runs a two-chunk prefill and two decode steps (kernel compiles, the initial-state variants). Decode times --decode-tokens greedy steps at that depth (median), with the
implementations' steps interleaved so that load from other processes hits them alike. Peak
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
import sys
import time
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import time_runs
from .common import _available_bytes, fmt_len, machine_info, model_costs, parse_lengths  # noqa: F401

# ours-plain: ours without the CPU fast path; mlx-lm+fast: mlx-lm with our CPU fast path swapped in
# (isolates what the model code does, e.g. attention memory, from the CPU matmul kernels)
IMPLS = ("ours", "ours-plain", "mlx-lm", "mlx-lm+fast")
DTYPES = ("fp32", "bf16", "q4")


def slice_config(layers: int = 5, experts: int = 16, vocab: int = 8192, tiny: bool = False) -> dict:
    """Published-style config.json of the slice: MLA every 4th layer (as in the real model: 5 layers
    put it at index 3, with a KDA layer after it), the rest KDA, layer 0 dense. tiny: small widths
    (hidden 128, 2 heads of 64) for smoke tests."""
    c = _slice_config(layers, experts, vocab)
    if tiny:
        c.update(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, head_dim=48,
                 moe_intermediate_size=64, num_experts_per_token=min(2, experts))
        c["linear_attn_config"].update(head_dim=64, num_heads=2)
    return c


def _slice_config(layers: int, experts: int, vocab: int) -> dict:
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
    projections halved) so the residual stream stays O(1) through the layers. numpy generates them
    on the CPU (several times faster than mx.random there), mx.random on a GPU (256 experts are
    ~7e9 weights: a minute of numpy, a second on the GPU)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    mx.random.seed(seed)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu

    def uniform(shape, std):
        if on_gpu:
            half = std * math.sqrt(3.0)
            return mx.random.uniform(-half, half, shape)
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


# MLA's up-projection: ours keeps it as one kv_b_proj [H*(nope+v), rank] (quantized along rank),
# mlx-lm splits it into embed_q [H, rank, nope] (quantized along nope) and unembed_out. Quantizing
# them would give the two models different weights, so both keep it in bf16 (4M weights a layer).
_DENSE_MLA = ("kv_b_proj", "embed_q", "unembed_out")


def _quant_predicate(path: str, m: nn.Module):
    """Same rule for both implementations: 4-bit / group 64 where the input width divides, the
    router 8-bit (mlx-lm's own choice), embeddings and MLA's kv_b left dense (see _DENSE_MLA)."""
    if not hasattr(m, "to_quantized") or isinstance(m, nn.Embedding):
        return False
    if path.endswith(_DENSE_MLA):
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
    counts = {}
    if impl in ("ours", "mlx-lm+fast"):
        from ..ops.cpu_fast import enable_cpu_fast_path

        counts = enable_cpu_fast_path(model)  # no-op off the CPU
    object.__setattr__(model, "bench_fast_path", counts)  # recorded in the results
    return model


def agreement(models: dict, vocab: int, tokens: int = 24, seed: int = 5) -> dict:
    """Logits of every implementation on the same tokens (no cache) against the first one: shows
    that the models hold the same weights (fp32: ~1e-5; bf16/q4: rounding of different op orders)."""
    import numpy as np

    ids = mx.random.randint(0, vocab, (1, tokens), key=mx.random.key(seed))
    outs = {}
    for impl, m in models.items():
        outs[impl] = np.asarray(m(ids).astype(mx.float32))[0]
    ref_impl = next(iter(outs))
    ref = outs[ref_impl]
    scale = float(np.abs(ref).max()) or 1.0
    res = {}
    for impl, o in outs.items():
        res[impl] = {"vs": ref_impl, "max_abs_diff": float(np.abs(o - ref).max()),
                     "rel_diff": float(np.abs(o - ref).max()) / scale,
                     "argmax_agree": float((o.argmax(-1) == ref.argmax(-1)).mean()),
                     "finite": bool(np.isfinite(o).all())}
    return res


def check_plan(experts: int, dtype: str = "auto") -> dict:
    """How the same-weights check runs: fp32 (the same weights agree to rounding, ~1e-6 relative),
    with the slice's experts, except on MLX-CUDA (0.32.4), where an fp32 model with 256 experts dies
    in gather_mm ("illegal memory access", ours and mlx-lm alike): there with 16 experts. Not bf16:
    with many experts a rounding difference flips the router's top-k and moves logits by O(1)
    (H200, 256 experts: 23% of the logit range, argmax agreeing on 88% of tokens)."""
    gpu = mx.default_device().type == mx.DeviceType.gpu
    cuda = gpu and mx.cuda.is_available()
    plan = {"dtype": "fp32" if dtype == "auto" else dtype, "experts": experts, "why": "requested"}
    if dtype == "auto":
        plan["why"] = "fp32: the same weights agree to rounding"
        if cuda and experts > 16:
            plan.update(experts=16, why="MLX-CUDA: fp32 gather_mm with many experts faults; 16 experts work")
    # GPU fp32 matmuls run as TF32 unless MLX_ENABLE_TF32=0 (H200, 16 experts: 5e-4 relative)
    tf32 = gpu and os.environ.get("MLX_ENABLE_TF32", "1") != "0"
    plan["rel_tol"] = (2e-3 if tf32 else 1e-4) if plan["dtype"] == "fp32" else 5e-2
    return plan


def same_weights_check(c: dict, base: dict, vocab: int, plan: dict, seed: int = 0) -> dict:
    """Logits of ours and mlx-lm built from the same tensors as plan says (its own slice and random
    weights where it asks for fewer experts); `ok` when mlx-lm's max |diff| relative to the logit
    range is within plan's tolerance."""
    res = {**plan, "layers": c["num_hidden_layers"]}
    try:
        if plan["experts"] != c["num_experts"]:
            c = {**c, "num_experts": plan["experts"]}
            base = random_weights(c, seed)
        ms = {i: build(i, c, base, plan["dtype"]) for i in ("ours", "mlx-lm")}
        res.update(agreement(ms, vocab)["mlx-lm"])
        res["ok"] = res["finite"] and res["rel_diff"] <= plan["rel_tol"]
        del ms
        print(f"same-weights check ({plan['dtype']}, {plan['experts']} experts, 24 tokens): mlx-lm logits vs "
              f"ours: max |diff| {res['max_abs_diff']:.2e} (rel {res['rel_diff']:.1e}, tolerance {plan['rel_tol']:.0e}: "
              f"{'ok' if res['ok'] else 'FAILED'}), argmax agree {res['argmax_agree']:.0%}", flush=True)
    except Exception as e:
        res.update(ok=False, error=f"{type(e).__name__}: {e}"[:200])
        print(f"same-weights check ({plan['dtype']}, {plan['experts']} experts): {res['error']}", flush=True)
    return res


def _cache_bytes(cache) -> int:
    """Bytes held by a cache (ours or mlx-lm's)."""
    if hasattr(cache, "nbytes"):  # ours
        return int(cache.nbytes)
    arrs = []
    for c in cache:
        if hasattr(c, "arrays"):
            arrs += list(c.arrays().values())
        elif hasattr(c, "keys") and c.keys is not None:
            arrs += [c.keys, c.values]
        elif hasattr(c, "cache"):
            arrs += [a for a in c.cache if isinstance(a, mx.array)]
    return int(sum(a.nbytes for a in arrs))


def fill_synthetic(impl: str, model, cache, depth: int, seed: int = 0) -> None:
    """Bring a cache (after a short real prefill) to `depth` tokens by appending random latent rows
    to the MLA layers (KDA layers keep a fixed-size state whatever the depth). Decode then costs
    what it costs after a real prefill of `depth` tokens, without spending minutes on it."""
    import numpy as np

    rng = np.random.default_rng(seed)
    done = cache.offset if impl.startswith("ours") else next(c.offset for c in cache if hasattr(c, "keys"))
    n = depth - done
    if n <= 0:
        return
    step = 4096
    for c in cache:
        if impl.startswith("ours"):
            if getattr(c, "kind", None) == "mla":  # through append(): whatever layout the cache keeps
                cfg = model.config
                D, dt = cfg.kv_lora_rank + cfg.qk_rope_head_dim, model.model.embed_tokens.weight.dtype
                for s in range(0, n, step):
                    m = min(step, n - s)
                    c.append(mx.array(rng.standard_normal((1, m, D), dtype=np.float32)).astype(dt))
                    cache.eval()
            else:
                c.offset += n
        elif hasattr(c, "keys"):  # mlx-lm KVCache: keys = normed latent, values = k_pe
            kd, vd, dt = c.keys.shape[-1], c.values.shape[-1], c.keys.dtype
            for s in range(0, n, step):
                m = min(step, n - s)
                k = mx.array(rng.standard_normal((1, 1, m, kd), dtype=np.float32)).astype(dt)
                v = mx.array(rng.standard_normal((1, 1, m, vd), dtype=np.float32)).astype(dt)
                c.update_and_fetch(k, v)
                mx.eval(c.keys, c.values)
        elif hasattr(c, "advance"):
            c.advance(n)


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


def lm_head(model, h):
    """Logits of final (normed) hidden states, ours or mlx-lm's (either may tie the embeddings)."""
    head = getattr(model, "lm_head", None)
    return head(h) if head is not None else model.model.embed_tokens.as_linear(h)


def prefill_chunk(impl: str, model, ids, cache):
    """One prefill chunk; returns the last position's logits [B, V], evaluated with the cache.
    Evaluating the output (not only the cache) makes every layer run: the cache alone doesn't
    need the attention of an MLA layer, nor anything after the last KDA layer's state."""
    logits = lm_head(model, _forward_hidden(impl, model, ids, cache)[:, -1])
    mx.eval(logits)
    _eval_cache(impl, cache)
    return logits


def _done(_) -> None:  # for time_runs: the timed function evaluates what it needs itself
    pass


def _logits_last(impl: str, model, tok, cache):
    if impl.startswith("ours"):
        return model(tok, cache=cache, last_n=1)[:, -1]
    return model(tok, cache=cache)[:, -1]


def prefill_one(impl: str, model, n: int, step: int, vocab: int, seed: int = 0, reserve: int | None = None):
    """Prefill n random tokens in chunks; returns (stats, cache, next token). Peak memory is the
    model's own weights plus the largest extra memory during this prefill. reserve: tokens the
    cache will hold in all (default n + 256: a reply), told to the cache as generation does."""
    ids = mx.random.randint(0, vocab, (1, n), key=mx.random.key(seed))
    mx.eval(ids)
    cache = _make_cache(impl, model)
    if hasattr(cache, "reserve"):
        cache.reserve(reserve or n + 256)
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()

    def run():
        for s in range(0, n, step):
            logits = prefill_chunk(impl, model, ids[:, s:s + step], cache)
            mx.clear_cache()
        tok = mx.argmax(logits, axis=-1)[:, None]
        mx.eval(tok)
        return logits, tok

    timing = time_runs(run, reps=1, warmup=0, finish=_done)
    (logits, tok), t = timing.out, timing.times[0]
    extra = mx.get_peak_memory() - base
    stats = {"prefill_s": t, "prefill_tok_s": n / t, "peak_extra_bytes": int(extra),
             "peak_mem_bytes": int(extra + weights_bytes(model)), "finite": bool(mx.isfinite(logits).all().item())}
    return stats, cache, tok


def greedy_step(impl: str, model, cache, tok):
    """One greedy decode step, evaluated (next token and the cache); returns the next token."""
    nxt = mx.argmax(_logits_last(impl, model, tok, cache), axis=-1)[:, None]
    mx.eval(nxt)
    _eval_cache(impl, cache)
    return nxt


def decode_step(impl: str, model, cache, tok):
    """One greedy decode step; returns (next token, seconds)."""
    t = time_runs(lambda: greedy_step(impl, model, cache, tok), reps=1, warmup=0, finish=_done)
    return t.out, t.times[0]


def pipelined_decode(impl: str, model, cache, tok, n: int):
    """n greedy steps as generation runs them (kimi_mlx.generate and mlx-lm alike): step i+1's graph
    is built and queued (async_eval) before step i's token is read back, so building the graph in
    Python overlaps the device's work. Returns (seconds per token, last token)."""
    def lazy_step(t):
        return mx.argmax(_logits_last(impl, model, t, cache), axis=-1)[:, None]

    y = lazy_step(tok)
    mx.eval(y)

    def run():
        nonlocal y
        nxt = lazy_step(y)
        mx.async_eval(nxt)
        for i in range(n):
            after = lazy_step(nxt) if i + 1 < n else None
            if after is not None:
                mx.async_eval(after)
            nxt.item() if nxt.size == 1 else mx.eval(nxt)
            y, nxt = nxt, after
        return y

    t = time_runs(run, reps=1, warmup=0, finish=_done)
    return t.times[0] / n, t.out


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def warmup_chunk(step: int) -> int:
    """Chunk of the warm-up prefill: the timed one on a GPU (kernels may be compiled per shape),
    a short one on the CPU (nothing is compiled there, and plain mlx-lm's prefill is slow)."""
    return step if mx.default_device().type != mx.DeviceType.cpu else min(step, 256)


def warm_up(impl: str, model, chunk: int, vocab: int, seed: int = 0, seconds: float = 0.0) -> None:
    """Run every kernel variant once before anything is timed: a prefill of two chunks (the second
    starts from a state: KDA's initial-state variant, MLA at depth) and two decode steps, then decode
    steps for `seconds` more (on the H200 the first depth timed after a short warm-up decoded ~15%
    slower than the same depth timed again later, Python's graph building included)."""
    _, cache, tok = prefill_one(impl, model, 2 * chunk, chunk, vocab, seed)
    tok = [tok]

    def step():
        tok[0] = greedy_step(impl, model, cache, tok[0])

    time_runs(step, reps=2, warmup=0, finish=_done)
    if seconds > 0:
        time_runs(step, reps=10**6, warmup=0, finish=_done, budget=seconds)


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
    "ours": [("kimi_mlx.model.kda", "kda_gated"), ("kimi_mlx.model.kda", "causal_short_conv"),
             ("kimi_mlx.model.mla", "mla_decode_attention"), ("kimi_mlx.model.mla", "mla_prefill_attention"),
             ("kimi_mlx.model.mla", "linear_weight"),
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
            t = time_runs(lambda: fn(*a, **k), reps=1, warmup=0)
            times[name] = times.get(name, 0.0) + t.times[0]
            calls[name] = calls.get(name, 0) + 1
            return t.out
        return run

    ids = mx.random.randint(0, vocab, (1, depth + tokens), key=mx.random.key(3))
    cache = _make_cache(impl, model)
    for s in range(0, depth, step):
        prefill_chunk(impl, model, ids[:, s:min(s + step, depth)], cache)
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
        chunk = ids[:, depth:depth + tokens]
        times["total"] = time_runs(lambda: prefill_chunk(impl, model, chunk, cache), reps=1, warmup=0,
                                   finish=_done).times[0]
    finally:
        for m, cls in swapped:
            m.__class__ = cls
        for module, fname, fn in patched:
            setattr(module, fname, fn)
    return {k: round(v, 5) for k, v in sorted(times.items(), key=lambda kv: -kv[1])} | \
        {"_calls": calls}


def weights_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _mlx_lm_attention_bytes(n: int, step: int, heads: int = 32, itemsize: int = 4) -> int:
    # mlx-lm's prefill materialises [heads, chunk, context] rope scores, their masked copy and the
    # attention scores (in the activations' dtype: bf16 for plain mlx-lm, fp32 behind our fast path)
    return 3 * heads * min(step, n) * n * itemsize


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


# same model code, other matmul kernels
_SIBLING = {"mlx-lm": "mlx-lm+fast", "ours-plain": "ours"}


def estimate(results: list[dict]) -> None:
    """Fill prefill_tok_s_est (and peak_mem_bytes_est for mlx-lm) where a prefill was skipped.

    Prefill time of one implementation is fitted as t(n) = a*n + b*n^2 (projections + KDA linear in
    n, MLA attention quadratic) through its measured lengths; with a single measured length, an
    implementation that differs from a measured sibling only by its matmul kernels (mlx-lm vs
    mlx-lm+fast: the same model code) is sibling(n) + n * (its per-token excess at the measured length)."""
    import numpy as np

    by = {(r["dtype"], r["impl"], r["length"]): r for r in results}
    for r in results + results:  # twice: a sibling's own estimate may come later in the list
        if r.get("prefill_tok_s") or not r.get("prefill_skipped"):
            continue
        dt, impl, n = r["dtype"], r["impl"], r["length"]
        meas = sorted((x["length"], x["prefill_s"]) for x in results
                      if x["dtype"] == dt and x["impl"] == impl and x.get("prefill_tok_s"))
        t_est = method = None
        probe = r.get("probe") or {}
        if probe.get("s") and meas:
            # chunk time grows linearly with depth (attention), so the mean chunk costs the average of a
            # chunk at depth 0 (the shortest measured prefill's rate) and the probed chunk at depth n - N
            m0, tm0 = meas[0]
            N = probe["tokens"]
            t_est = n / N * (N * tm0 / m0 + probe["s"]) / 2
            method = (f"measured {N}-token chunk at depth {fmt_len(probe['depth'])} (synthetic cache) averaged "
                      f"with a depth-0 chunk at the {fmt_len(m0)} prefill rate; attention linear in depth")
        elif len(meas) >= 2:
            A = np.array([[m, m * m] for m, _ in meas], float)
            y = np.array([t for _, t in meas], float)
            (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
            b = max(b, 0.0)
            a = a if a > 0 else float(np.mean([t / m for m, t in meas]))
            t_est = a * n + b * n * n
            method = f"fit t(n)=a*n+b*n^2 through {impl}'s measured lengths {[fmt_len(m) for m, _ in meas]}"
        sib = _SIBLING.get(impl)
        short = r.get("short_prefill") or {}
        if not meas and short.get("sibling_s"):  # only the short prefill: its per-token excess
            meas = [(short["tokens"], short["s"])]
            by[(dt, sib, short["tokens"])] = {"prefill_s": short["sibling_s"]}
        if sib and meas and t_est is None:
            s_n = by.get((dt, sib, n))
            s_rate = (s_n.get("prefill_tok_s_est") or s_n.get("prefill_tok_s_est_if_it_fit")) if s_n else None
            s_t = s_n.get("prefill_s") or (s_rate and n / s_rate) if s_n else None
            m0, t0 = meas[-1]
            s_m = by.get((dt, sib, m0))
            if s_t and s_m and s_m.get("prefill_s"):
                t_est = s_t + n * (t0 - s_m["prefill_s"]) / m0
                method = (f"{sib} at {fmt_len(n)}{' (est)' if not s_n.get('prefill_s') else ''} + {impl}'s "
                          f"per-token matmul excess over {sib} measured at {fmt_len(m0)}")
        if t_est and "GiB" in r["prefill_skipped"]:
            # it can't run here: kept only as the compute-time input of a sibling's estimate
            r["prefill_tok_s_est_if_it_fit"] = n / t_est
            r["prefill_est_method"] = method
        elif t_est:
            r["prefill_tok_s_est"] = n / t_est
            r["prefill_est_method"] = method
        if probe.get("peak_extra_bytes") and r.get("weights_bytes") and probe["tokens"] >= r.get("step", 0):
            # the deepest chunk is where the prefill peaks (cache at its largest): measured in the probe
            r["peak_mem_bytes_est"] = r["weights_bytes"] + probe["peak_extra_bytes"] + probe.get("cache_bytes", 0)
            r["peak_mem_est_method"] = "weights + the probe chunk's measured extra memory + the cache"
        elif impl.startswith("mlx-lm") and r.get("weights_bytes"):
            # the sibling's measured peak with its attention buffers swapped for ours (bf16 vs fp32
            # scores), else weights + attention buffers alone (an underestimate: no activations)
            s_n = by.get((dt, sib, n)) if sib else None
            if s_n and s_n.get("peak_mem_bytes") and s_n.get("attention_bytes_est"):
                r["peak_mem_bytes_est"] = (s_n["peak_mem_bytes"] - s_n["weights_bytes"] - s_n["attention_bytes_est"]
                                           + r["weights_bytes"] + r.get("attention_bytes_est", 0))
                r["peak_mem_est_method"] = f"{sib}'s measured peak, its fp32 attention buffers replaced by bf16 ones"
            else:
                r["peak_mem_bytes_est"] = r["weights_bytes"] + r.get("attention_bytes_est", 0)
                r["peak_mem_est_method"] = "weights + mlx-lm's attention buffers (analytic; without activations)"


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
                    live[impl] = [cache, tok, []]
                except Exception as e:
                    r["error"] = f"{type(e).__name__}: {e}"[:200]
            # decode, interleaved: each round runs one step of every implementation, so load from
            # other processes hits all of them alike; the first round is a warm-up
            for i in range(a.decode_tokens + 1):
                for impl, st in list(live.items()):
                    try:
                        st[1], dt_s = decode_step(impl, models[impl], st[0], st[1])
                        if i:
                            st[2].append(dt_s)
                    except Exception as e:
                        row[impl]["error"] = f"decode: {type(e).__name__}: {e}"[:200]
                        live.pop(impl)
            for impl, st in live.items():
                med = _median(st[2])
                row[impl].update({"decode_tok_s": 1 / med if med else None,
                                  "decode_ms_median": med * 1e3 if med else None,
                                  "decode_ms_all": [round(x * 1e3, 2) for x in st[2]]})
                if a.decode_tokens > 1:  # what generation sees: graph building overlaps the device
                    try:
                        sec, st[1] = pipelined_decode(impl, models[impl], st[0], st[1], a.decode_tokens)
                        row[impl]["decode_pipelined_tok_s"] = 1 / sec
                    except Exception as e:
                        row[impl]["error"] = f"pipelined decode: {type(e).__name__}: {e}"[:200]
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
                    msg += f"  decode {r['decode_tok_s']:6.2f} tok/s ({r['decode_depth']} depth)"
                if r.get("decode_pipelined_tok_s"):
                    msg += f", pipelined {r['decode_pipelined_tok_s']:6.2f} tok/s"
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
