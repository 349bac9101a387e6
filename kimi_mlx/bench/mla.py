"""MLA attention at the real widths: decode cache-read bandwidth, prefill TFLOP/s (vs torch SDPA).

    python -m kimi_mlx.bench mla                                   # decode 4K,32K,128K; prefill 32K,128K
    python -m kimi_mlx.bench mla --depths 4K,32K,128K --prefill 32K,128K --chunk 2048 --json out/bench_mla.json

32 heads, kv_lora_rank 512, rope 64, nope 128, v 128, B=1, bf16 (--tiny shrinks the widths).

decode: `kimi_mlx.ops.attention.mla_decode_attention(q_abs, cache, scale, d_v)`, q_abs [B, H, 1, rank + rope]
against a filled kimi_mlx.cache.MLACache -> [B, H, 1, rank]. Bandwidth = bytes of the cached rows
read / time per call, with --calls-per-eval calls in one evaluated graph (the kernels' own time,
not a host sync per call; one evaluated call's latency is reported too), next to the copy
bandwidth measured in the same run (x + 1 over --copy-mib of bf16: read + write bytes / time).

prefill: `kimi_mlx.ops.attention.mla_prefill_attention(q, cache, expand_kv, scale, d_rope=, d_v=,
q_offset=, expand=)` (prefill_call is the one place that knows it) over a whole causal sequence of
S tokens from depth 0, in --chunk chunks: chunk c's queries q [B, T, H, nope + rope] sit at
q_offset = c * T and see keys 0..q_offset + T - 1 of a cache holding the S rows; expand_kv is a
kv_b_proj of random weights. TFLOP/s counts the useful attention work, 2 * H * (nope + rope + v)
per visible (query, key) pair (and, second, with the kv_b expansion's FLOPs). With torch and
CUDA, torch.nn.functional.scaled_dot_product_attention runs the same causal problem in one call
(q [1, H, S, nope + rope], k [1, H, S, nope + rope], v [1, H, S, v], is_causal), by itself and with
each SDPA backend forced in turn; the backend torch picks is named.

--impl kernel,reference: the same function with KIMI_MLX_MLA unset (dispatch picks the kernel
where there is one) and =reference (the plain MLX-ops path). Until those functions exist the
bench says "not available"; --fallback times the reference ops (latent_attention,
expanded_attention) through adapters instead, to exercise the harness.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
import mlx.core as mx

from . import Timing, time_runs, time_torch_cuda
from .model import fmt_len, machine_info, parse_lengths
from .roofline import copy_bandwidth

ENV = "KIMI_MLX_MLA"
REAL = {"heads": 32, "rank": 512, "rope": 64, "nope": 128, "v": 128}
TINY = {"heads": 4, "rank": 64, "rope": 16, "nope": 32, "v": 32}
DTYPES = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}


@contextmanager
def impl_env(impl: str):
    """kernel: KIMI_MLX_MLA unset (default dispatch); reference: KIMI_MLX_MLA=reference. Dispatch
    reads it per call, so setting it around the calls is enough."""
    old = os.environ.pop(ENV, None)
    if impl == "reference":
        os.environ[ENV] = "reference"
    try:
        yield
    finally:
        os.environ.pop(ENV, None)
        if old is not None:
            os.environ[ENV] = old


def decode_adapter(q, source, scale, d_v, q_offset=None):
    """mla_decode_attention's contract over the reference op (for --fallback)."""
    from ..ops.attention import latent_attention

    T = q.shape[2]
    return latent_attention(q, source.blocks(), d_v, scale, source.offset - T if q_offset is None else q_offset)


def prefill_adapter(q, source, expand_kv, scale, d_rope, d_v, q_offset=None, expand=None):
    """mla_prefill_attention's contract over the reference op (for --fallback)."""
    from ..ops.attention import expanded_attention

    T = q.shape[1]
    q_offset = source.offset - T if q_offset is None else q_offset
    o = expanded_attention(q.transpose(0, 2, 1, 3), source.blocks(), expand, scale, q_offset)
    return o.transpose(0, 2, 1, 3)


class Expansion:
    """kv_b_proj of the latents with a random weight: expand_kv(rows) -> kv [B, n, H, nope + v] for
    the kernels, expand(rows) -> (k [B, H, n, nope + rope], v [B, H, n, v]) for the plain path."""

    def __init__(self, dims: dict, dt, seed: int = 7):
        H, rank, self.nope, self.v, self.rope = dims["heads"], dims["rank"], dims["nope"], dims["v"], dims["rope"]
        self.H, self.rank = H, rank
        self.w = (mx.random.normal((H * (self.nope + self.v), rank), key=mx.random.key(seed)) * rank ** -0.5).astype(dt)
        mx.eval(self.w)

    def expand_kv(self, rows):
        B, n, _ = rows.shape
        return (rows[..., : self.rank] @ self.w.T).reshape(B, n, self.H, self.nope + self.v)

    def expand(self, rows):
        B, n, _ = rows.shape
        kv = self.expand_kv(rows).transpose(0, 2, 1, 3)
        k_pe = mx.broadcast_to(rows[:, None, :, self.rank:], (B, self.H, n, self.rope)).astype(kv.dtype)
        return mx.concatenate([kv[..., : self.nope], k_pe], axis=-1), kv[..., self.nope:]

    def flops(self, keys: int) -> int:
        return 2 * keys * self.rank * self.H * (self.nope + self.v)


def filled_cache(B: int, S: int, D: int, dt, bits=None, seed: int = 0):
    """An MLACache holding S random rows (the attention's cost doesn't depend on their values)."""
    from ..cache import KimiCache, MLACache

    cache = MLACache(bits=bits)
    if hasattr(cache, "reserve"):
        cache.reserve(S)
    for s in range(0, S, 4096):
        n = min(4096, S - s)
        cache.append(mx.random.normal((B, n, D), key=mx.random.key(seed + s)).astype(dt))
        KimiCache([cache]).eval()
    return cache


def kernel_backend(impl: str) -> str | None:
    """What the MLA dispatch runs under this impl's env: 'cuda', 'metal' or None (the plain path)."""
    try:
        from metal_kernels import mla as K
    except ImportError:
        return None
    with impl_env(impl):
        return K.backend()


def lookup(name: str, fallback: bool):
    """(callable, where it came from) or (None, why not)."""
    mod = importlib.import_module("kimi_mlx.ops.attention")
    fn = getattr(mod, name, None)
    if fn is not None:
        return fn, f"kimi_mlx.ops.attention.{name}"
    if fallback:
        adapter = {"mla_decode_attention": decode_adapter, "mla_prefill_attention": prefill_adapter}[name]
        return adapter, f"adapter over the reference op ({adapter.__name__}: {name} is not available)"
    return None, f"not available: kimi_mlx.ops.attention has no {name}"


def row_bytes(D: int, itemsize: int, bits: int | None, group: int = 64) -> int:
    """Bytes of one cached row as the attention reads it (8-bit: codes + a scale and bias per group)."""
    if bits is None:
        return D * itemsize
    dq = -(-D // group) * group
    return dq + 2 * (dq // group) * itemsize


def _diff(a, b) -> float:
    if a.shape != b.shape and a.ndim == 4 and a.transpose(0, 2, 1, 3).shape == b.shape:
        a = a.transpose(0, 2, 1, 3)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} vs the reference's {b.shape}")
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def bench_decode(a, dims, dt, copy_GBps, report) -> list[dict]:
    fn, src = lookup("mla_decode_attention", a.fallback)
    if fn is None:
        report(f"decode: {src}")
        return [{"mode": "decode", "error": src}]
    H, rank, rope = dims["heads"], dims["rank"], dims["rope"]
    D, scale = rank + rope, (dims["nope"] + rope) ** -0.5
    rows_out = []
    for depth in parse_lengths(a.depths):
        cache = filled_cache(a.batch, depth, D, dt, a.cache_bits)
        q = mx.random.normal((a.batch, H, 1, D), key=mx.random.key(depth + 1)).astype(dt)
        mx.eval(q)
        nbytes = a.batch * depth * row_bytes(D, dt.size, a.cache_bits)
        here, outs = [], {}
        for impl in a.impl.split(","):
            r = {"mode": "decode", "impl": impl, "depth": depth, "function": src, "cache_bits": a.cache_bits,
                 "backend": kernel_backend(impl), "bytes_read": nbytes}
            try:
                with impl_env(impl):
                    # N calls in one graph: the kernels' own time, not one host sync per call
                    N = a.calls_per_eval
                    t = time_runs(lambda: [fn(q, cache, scale, rank) for _ in range(N)], a.decode_repeats, a.warmup)
                    one = time_runs(lambda: fn(q, cache, scale, rank), a.decode_repeats, a.warmup)
                outs[impl] = one.out
                per = Timing([x / N for x in t.times])
                r.update(per.ms(), calls_per_eval=N, eval_ms_median=one.median * 1e3, eval_ms_min=one.min * 1e3,
                         eval_ms_max=one.max * 1e3, GBps=nbytes / per.median / 1e9, GBps_best=nbytes / per.min / 1e9,
                         fraction_of_copy=nbytes / per.median / 1e9 / copy_GBps)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:300]
            here.append(r)
        for r in here:
            if r["impl"] in outs and "reference" in outs:
                try:
                    r["max_abs_diff_vs_reference"] = _diff(outs[r["impl"]], outs["reference"])
                except ValueError as e:
                    r["check_error"] = str(e)
            report(_fmt_decode(r))
        rows_out += here
        del cache, outs
        gc.collect()
        mx.clear_cache()
    return rows_out


def _fmt_decode(r: dict) -> str:
    head = f"decode {r['impl']:9s} depth {fmt_len(r['depth']):>5s}:"
    if "error" in r:
        return f"{head} {r['error']}"
    frac = f" = {r['fraction_of_copy']:.0%} of copy"
    chk = f", |diff| vs reference {r['max_abs_diff_vs_reference']:.1e}" if "max_abs_diff_vs_reference" in r else ""
    return (f"{head} {r['ms_median'] * 1e3:8.1f} us [{r['ms_min'] * 1e3:.1f}-{r['ms_max'] * 1e3:.1f}] per call "
            f"({r['calls_per_eval']} a graph; {r['eval_ms_median'] * 1e3:.0f} us one eval'd call)  "
            f"{r['GBps']:7.1f} GB/s{frac}{chk} ({r['backend'] or 'plain path'})")


def causal_pairs(q_offset: int, T: int) -> int:
    """Visible (query, key) pairs of T queries at q_offset.. (query t sees keys 0..q_offset + t)."""
    return T * q_offset + T * (T + 1) // 2


def prefill_call(fn, ex: Expansion, q, cache, q_offset: int, scale: float):
    """The one place that knows mla_prefill_attention's signature."""
    return fn(q, cache, ex.expand_kv, scale, d_rope=ex.rope, d_v=ex.v, q_offset=q_offset, expand=ex.expand)


def bench_prefill(a, dims, dt, report) -> list[dict]:
    fn, src = lookup("mla_prefill_attention", a.fallback)
    H, rank, rope, nope, v = dims["heads"], dims["rank"], dims["rope"], dims["nope"], dims["v"]
    scale = (nope + rope) ** -0.5
    flops_per_pair = 2 * H * (nope + rope + v)
    rows_out = []
    ex = Expansion(dims, dt)
    if fn is not None:
        check = prefill_check(fn, ex, dims, dt, a.chunk)
        rows_out.append({"mode": "prefill-check", "function": src, **check})
        report(f"prefill check (a chunk at depth, vs expanded_attention): max |diff| {check['max_abs_diff']}")
    for S in parse_lengths(a.prefill):
        r_torch = torch_sdpa(S, dims, a.dtype, scale, a.repeats) if not a.no_torch else {"skipped": "--no-torch"}
        if fn is None:
            report(f"prefill: {src}")
            rows_out.append({"mode": "prefill", "length": S, "error": src, "torch": r_torch})
            _report_torch(report, S, r_torch)
            continue
        T = min(a.chunk, S)
        # the cache holds all S rows; chunk c's queries at q_offset = c*T see keys 0..q_offset+T-1
        cache = filled_cache(a.batch, S, rank + rope, dt, a.cache_bits)
        q = mx.random.normal((a.batch, S, H, nope + rope), key=mx.random.key(1)).astype(dt)
        starts = list(range(0, S, T))
        qs = [q[:, s:s + T] for s in starts]  # contiguous views (B = 1), evaluated before timing
        mx.eval(qs)
        attn_flops = a.batch * flops_per_pair * causal_pairs(0, S)
        expand_flops = sum(a.batch * ex.flops(s + qc.shape[1]) for s, qc in zip(starts, qs))
        for impl in a.impl.split(","):
            r = {"mode": "prefill", "impl": impl, "length": S, "chunk": T, "function": src,
                 "backend": kernel_backend(impl), "flops": attn_flops, "expand_flops": expand_flops}
            try:
                with impl_env(impl):
                    # each chunk has its own depth: timed one by one (median of --repeats each),
                    # after one untimed call at the deepest (compiles, allocations)
                    time_runs(lambda: prefill_call(fn, ex, qs[-1], cache, starts[-1], scale), reps=1, warmup=0)
                    per = [time_runs(lambda s=s, qc=qc: prefill_call(fn, ex, qc, cache, s, scale), a.repeats, warmup=0)
                           for s, qc in zip(starts, qs)]
                med = sum(t.median for t in per)
                r.update(s_median=med, s_min=sum(t.min for t in per), s_max=sum(t.max for t in per),
                         repeats=a.repeats, TFLOPs=attn_flops / med / 1e12,
                         TFLOPs_with_expand=(attn_flops + expand_flops) / med / 1e12,
                         chunks=[{"q_offset": s, "ms_median": t.median * 1e3, "ms_min": t.min * 1e3,
                                  "ms_max": t.max * 1e3} for s, t in zip(starts, per)])
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {e}"[:300]
            r["torch"] = r_torch
            theirs = r_torch.get("default", {}).get("s_median")
            if theirs and r.get("s_median"):
                r["torch_time_over_ours"] = theirs / r["s_median"]  # the target: >= 0.5
            rows_out.append(r)
            report(_fmt_prefill(r))
        _report_torch(report, S, r_torch)
        del q, qs, cache
        gc.collect()
        mx.clear_cache()
    return rows_out


def prefill_check(fn, ex: Expansion, dims, dt, T) -> dict:
    """One chunk of min(T, 256) queries at a depth of the same size: the function (with each
    KIMI_MLX_MLA setting) against expanded_attention, the reference op, called directly."""
    from ..ops.attention import expanded_attention

    t = min(T, 256)
    cache = filled_cache(1, 2 * t, dims["rank"] + dims["rope"], dt, seed=11)
    q = mx.random.normal((1, t, dims["heads"], dims["nope"] + dims["rope"]), key=mx.random.key(4)).astype(dt)
    scale = (dims["nope"] + dims["rope"]) ** -0.5
    ref = expanded_attention(q.transpose(0, 2, 1, 3), cache.blocks(), ex.expand, scale, t).transpose(0, 2, 1, 3)
    out = {}
    for impl in ("kernel", "reference"):
        try:
            with impl_env(impl):
                out[impl] = _diff(prefill_call(fn, ex, q, cache, t, scale), ref)
        except Exception as e:
            out[impl] = f"{type(e).__name__}: {e}"[:200]
    return {"queries": t, "q_offset": t, "max_abs_diff": out,
            "backends": {impl: kernel_backend(impl) for impl in ("kernel", "reference")}}


def _fmt_prefill(r: dict) -> str:
    head = f"prefill {r['impl']:9s} S {fmt_len(r['length']):>5s} (chunks of {r['chunk']}):"
    if "error" in r:
        return f"{head} {r['error']}"
    ratio = f"  torch/ours time {r['torch_time_over_ours']:.2f}" if "torch_time_over_ours" in r else ""
    return (f"{head} {r['s_median']:.3f} s [{r['s_min']:.3f}-{r['s_max']:.3f}]  {r['TFLOPs']:.3g} TFLOP/s "
            f"({r['TFLOPs_with_expand']:.3g} with the kv_b expansion; {r['backend'] or 'plain path'}){ratio}")


def _report_torch(report, S, t: dict) -> None:
    if "skipped" in t or "error" in t:
        report(f"torch sdpa S {fmt_len(S)}: {t.get('skipped') or t.get('error')}")
        return
    for name in TORCH_BACKENDS:
        x = t[name]
        msg = x.get("error") or f"{x['s_median'] * 1e3:9.2f} ms  {x['TFLOPs']:.1f} TFLOP/s"
        report(f"torch sdpa S {fmt_len(S)} {name:9s}: {msg}")
    report(f"torch sdpa S {fmt_len(S)}: torch picks {t.get('picked')}")


TORCH_BACKENDS = ("default", "flash", "cudnn", "efficient")


def torch_sdpa(S: int, dims: dict, dtype: str, scale: float, reps: int) -> dict:
    """torch's SDPA on the same causal problem (T = S from depth 0), each backend forced in turn."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {"skipped": "torch is not importable"}
    if not torch.cuda.is_available():
        return {"skipped": "torch has no CUDA device"}
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    H, dk, dv = dims["heads"], dims["nope"] + dims["rope"], dims["v"]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, H, S, dk, device="cuda", dtype=tdt, generator=g) for _ in range(2))
    v = torch.randn(1, H, S, dv, device="cuda", dtype=tdt, generator=g)
    flops = 2 * H * (dk + dv) * causal_pairs(0, S)
    out = {"shapes": {"q": list(q.shape), "k": list(k.shape), "v": list(v.shape)}, "is_causal": True,
           "torch": torch.__version__}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                    ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
        try:
            out["picked"] = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, scale=scale)).name
        except Exception as e:  # a private API: say so rather than fail
            out["picked"] = f"unknown ({type(e).__name__})"
    except ImportError:
        sdpa_kernel, backends = None, []
        out["picked"] = "unknown (no torch.nn.attention)"
    for name in TORCH_BACKENDS[len(backends) + 1:]:
        out[name] = {"error": "no torch.nn.attention"}

    for name, be in [("default", None)] + backends:
        try:
            with sdpa_kernel([be]) if be is not None else nullcontext(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # why a forced backend declines: the error below says it
                t = time_torch_cuda(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
                                    torch, reps)
            out[name] = {"s_median": t.median, "s_min": t.min, "s_max": t.max, "TFLOPs": flops / t.median / 1e12}
        except Exception as e:  # the backend doesn't take these shapes
            out[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    del q, k, v
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kimi_mlx.bench mla", description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4K,32K,128K", help="decode cache depths ('' : no decode)")
    ap.add_argument("--prefill", default="32K,128K", help="prefill lengths S from depth 0 ('' : no prefill)")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill queries per call")
    ap.add_argument("--impl", default="kernel,reference", help="kernel (default dispatch), reference (KIMI_MLX_MLA=reference)")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cache-bits", type=int, default=None, choices=(8,), help="8-bit cache pages")
    ap.add_argument("--decode-repeats", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="prefill repeats (per chunk) and torch repeats")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode calls before timing")
    ap.add_argument("--calls-per-eval", type=int, default=16,
                    help="decode calls per evaluated graph for the bandwidth (one eval'd call is timed too)")
    ap.add_argument("--copy-mib", type=int, default=2048, help="size of the copy-bandwidth buffer (MiB)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--fallback", action="store_true",
                    help="time the reference ops through adapters where the MLA functions don't exist yet")
    ap.add_argument("--tiny", action="store_true", help=f"widths {TINY} instead of {REAL} (smoke tests)")
    ap.add_argument("--json", default="out/bench_mla.json")
    a = ap.parse_args(argv)
    for impl in a.impl.split(","):
        if impl not in ("kernel", "reference"):
            ap.error(f"unknown impl {impl!r}")
    dims = TINY if a.tiny else REAL
    dt = DTYPES[a.dtype]
    info = machine_info()
    out = {"machine": info, "args": vars(a), "dims": dims, "env_var": ENV}

    def report(msg):
        print(f"  {msg}", flush=True)

    print(f"device {info['device']}, mlx {info.get('mlx')}; MLA {dims}, {a.dtype}, B={a.batch}", flush=True)
    copy = None
    if a.depths:
        out["copy"] = copy = copy_bandwidth(a.copy_mib, dt, reps=10)
        report(f"copy bandwidth ({copy['op']}, read + write): {copy['GBps_median']:.1f} GB/s median, "
               f"{copy['GBps_best']:.1f} best")
        out["decode"] = bench_decode(a, dims, dt, copy["GBps_median"], report)
    if a.prefill:
        out["prefill"] = bench_prefill(a, dims, dt, report)
    path = Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
