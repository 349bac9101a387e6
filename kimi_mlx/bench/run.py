"""Running the slice model (bench model's "run" step): caches (real or synthetic depth), chunked
prefill, greedy decode steps timed alone or pipelined as generation runs them, warm-up, and the
per-module profile."""
from __future__ import annotations

import gc

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx
from mlx.utils import tree_flatten

from . import time_runs

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
    slower than the same depth timed again later, Python's graph building included).

    Our MLA prefill expands the cache in blocks and chains a block's kernel from the previous
    block's (o, lse) only past EXPAND_BLOCK_BYTES (16K keys at the real widths): that kernel
    instance would be built (NVRTC: seconds) inside the first long prefill timed, so the warm-up
    runs with blocks of EXPAND_MIN_KEYS."""
    from metal_kernels import mla as K

    from ..ops import attention as A

    block = A.EXPAND_BLOCK_BYTES
    n = max(2 * chunk, A.EXPAND_MIN_KEYS + chunk) if K.backend() is not None else 2 * chunk
    A.EXPAND_BLOCK_BYTES = 0  # blocks of EXPAND_MIN_KEYS: the chained variant runs in the warm-up too
    try:
        _, cache, tok = prefill_one(impl, model, n, chunk, vocab, seed)
    finally:
        A.EXPAND_BLOCK_BYTES = block
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
