"""MLA attention kernels on a GPU (the CUDA twin): correctness against the plain MLX-ops path
and torch's scaled_dot_product_attention, and timings against the copy bandwidth and torch's
attention, in one process. Writes a JSON of every row.

    python3 scripts/mla_device_check.py [--json out.json] [--depths 4K,32K,128K] [--prefill 32K,128K]

Real widths: 32 heads, kv_lora_rank 512, rope 64, nope 128, v 128 (rows of 576, values 512 in
the absorbed decode; per-head keys 192 / values 128 in the expanded prefill).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kimi_mlx.bench import roofline  # noqa: E402
from kimi_mlx.bench.common import parse_lengths  # noqa: E402
from kimi_mlx.cache import MLACache  # noqa: E402
from kimi_mlx.ops import attention as A  # noqa: E402
from metal_kernels import mla as K  # noqa: E402

H, DL, DR, NOPE, DV = 32, 512, 64, 128, 128
D, DK = DL + DR, NOPE + DR
ROWS = []


def row(**kw):
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def timeit(fn, reps=10, warm=2):
    for _ in range(warm):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def rel(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.sqrt(mx.sum((a - b) ** 2)) / mx.maximum(mx.sqrt(mx.sum(b * b)), 1e-30))


def with_ref(fn):
    os.environ["KIMI_MLX_MLA"] = "reference"
    try:
        return fn()
    finally:
        os.environ.pop("KIMI_MLX_MLA", None)


def cache_of(rows, bits=None, appends=None):
    c = MLACache(bits=bits)
    c.reserve(rows.shape[1])
    pos = 0
    for n in appends or [rows.shape[1]]:
        c.append(rows[:, pos:pos + n])
        pos += n
    mx.eval(c.eval_arrays())
    return c


def check_decode(dt):
    for B, T, appends, bits in ((1, 1, [1000], None), (2, 1, [700, 333], None), (1, 3, [2049], None),
                                (2, 1, [1500, 77], 8)):
        mx.random.seed(B + T)
        S = sum(appends)
        rows = (mx.random.normal((B, S, D)) * 0.5).astype(dt)
        c = cache_of(rows, bits, appends)
        q = (mx.random.normal((B, H, T, D)) * 0.05).astype(dt)
        out = A.mla_decode_attention(q, c, 0.072, DL)
        ref = with_ref(lambda: A.mla_decode_attention(q, c, 0.072, DL))
        exact = A.latent_attention_reference(q.astype(mx.float32), mx.concatenate(c.blocks(), 1).astype(mx.float32),
                                             DL, 0.072, S - T)
        row(check="decode", dtype=str(dt), B=B, T=T, segments=appends, bits=bits,
            rel_vs_reference=rel(out, ref), rel_vs_fp32=rel(out, exact))


def _expand_fns(w):
    def kv(rows):
        B, n, _ = rows.shape
        return (rows[..., :DL] @ w).reshape(B, n, H, NOPE + DV)

    def split(rows):
        B, n, _ = rows.shape
        x = kv(rows).transpose(0, 2, 1, 3)
        kpe = mx.broadcast_to(rows[:, None, :, DL:], (B, H, n, DR))
        return mx.concatenate([x[..., :NOPE], kpe], axis=-1), x[..., NOPE:]

    return kv, split


def check_prefill(dt):
    torch, dev = _torch()

    for B, T, before in ((1, 300, 0), (2, 257, 1000), (1, 2048, 3000)):
        mx.random.seed(T)
        rows = (mx.random.normal((B, before + T, D)) * 0.5).astype(dt)
        w = (mx.random.normal((DL, H * (NOPE + DV))) * 0.05).astype(dt)
        kv, split = _expand_fns(w)
        c = cache_of(rows, appends=[n for n in (before, T) if n])
        q = (mx.random.normal((B, T, H, DK)) * 0.5).astype(dt)
        out = A.mla_prefill_attention(q, c, kv, DK ** -0.5, DR, DV, expand=split)
        ref = with_ref(lambda: A.mla_prefill_attention(q, c, kv, DK ** -0.5, DR, DV, expand=split))
        # torch sdpa on the same expanded keys/values, fp32, explicit causal-at-offset mask
        k, v = split(rows)
        tq, tk, tv = (torch.from_numpy(np.array(x.astype(mx.float32))).to(dev)
                      for x in (q.transpose(0, 2, 1, 3), k, v))
        S = before + T
        mask = torch.arange(S, device=dev)[None, :] <= (before + torch.arange(T, device=dev))[:, None]
        to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask, scale=DK ** -0.5)
        tref = mx.array(to.transpose(1, 2).contiguous().cpu().numpy())
        row(check="prefill", dtype=str(dt), B=B, T=T, depth=before, rel_vs_reference=rel(out, ref),
            rel_vs_torch_sdpa_fp32=rel(out, tref))


def _torch():
    import torch

    return torch, "cuda" if torch.cuda.is_available() else "cpu"


def copy_bandwidth():
    c = roofline.copy_bandwidth(2048, mx.bfloat16, reps=10)
    row(bench="copy", what=c["op"] + " (read + write bytes / time)", GBps=c["GBps_median"],
        ms=c["ms_median"], ms_min=c["ms_min"], ms_max=c["ms_max"])
    return c["GBps_median"] * 1e9


def bench_decode(depths, copy_bw):
    for S in depths:
        mx.random.seed(S)
        rows = (mx.random.normal((1, S, D)) * 0.5).astype(mx.bfloat16)
        for bits in (None, 8):
            c = cache_of(rows, bits)
            q = (mx.random.normal((1, H, 1, D)) * 0.05).astype(mx.bfloat16)
            kern = timeit(lambda: A.mla_decode_attention(q, c, 0.072, DL), reps=20)
            refm = with_ref(lambda: timeit(lambda: A.mla_decode_attention(q, c, 0.072, DL), reps=5))
            nbytes = c.nbytes * S / max(1, sum(s["cap"] for s in c.segs))
            # mlx-lm's decode: sdpa over the latent cache with the rope scores as an additive mask
            lat = rows[:, None, :, :DL]
            kpe = rows[:, None, :, DL:]
            qn, qp = q[..., :DL], q[..., DL:]

            def mlx_lm_style():
                pe = (qp * 0.072) @ kpe.swapaxes(-1, -2)
                return mx.fast.scaled_dot_product_attention(qn, lat, lat, scale=0.072, mask=pe)

            ml = timeit(mlx_lm_style, reps=20) if bits is None else (float("nan"),) * 3
            row(bench="decode", depth=S, bits=bits, kernel_ms=kern[0] * 1e3, kernel_ms_min=kern[1] * 1e3,
                kernel_ms_max=kern[2] * 1e3, reference_ms=refm[0] * 1e3, mlx_sdpa_ms=ml[0] * 1e3,
                cache_GBps=nbytes / kern[0] / 1e9, frac_of_copy=(nbytes / kern[0]) / copy_bw)


def bench_prefill(lengths, reps=7):
    torch, dev = _torch()

    for S in lengths:
        mx.random.seed(S)
        q = (mx.random.normal((1, S, H, DK)) * 0.5).astype(mx.bfloat16)
        rows = (mx.random.normal((1, S, D)) * 0.5).astype(mx.bfloat16)
        kvx = (mx.random.normal((1, S, H, NOPE + DV)) * 0.5).astype(mx.bfloat16)
        mx.eval(q, rows, kvx)
        flops = 2 * (S * (S + 1) / 2) * H * (DK + DV)
        if K.backend() is None:
            row(bench="prefill", T=S, note="no MLA kernel on this device")
            continue
        tq = torch.randn(1, H, S, DK, device=dev, dtype=torch.bfloat16)
        tk = torch.randn(1, H, S, DK, device=dev, dtype=torch.bfloat16)
        tv = torch.randn(1, H, S, DV, device=dev, dtype=torch.bfloat16)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        ours_f = lambda: mx.eval(K.mla_prefill_block(q, kvx, rows, S, 0, 0, DK ** -0.5, DV, DR)[0])  # noqa: E731

        def torch_f():
            sdpa(tq, tk, tv, is_causal=True)
            sync()

        # alternated, so that both see the same clocks (cuDNN's own time moves ~10 % between processes)
        to, ts = [], []
        for i in range(reps + 1):
            for f, acc in ((ours_f, to), (torch_f, ts)):
                t = time.perf_counter()
                f()
                if i:  # the first round compiles and warms up
                    acc.append(time.perf_counter() - t)
        ours = statistics.median(to), min(to), max(to)
        tm = statistics.median(ts)
        row(bench="prefill", T=S, S=S, reps=reps, ours_ms=ours[0] * 1e3, ours_ms_min=ours[1] * 1e3, ours_ms_max=ours[2] * 1e3,
            ours_TFLOPs=flops / ours[0] / 1e12, torch_sdpa_ms=tm * 1e3, torch_ms_min=min(ts) * 1e3,
            torch_ms_max=max(ts) * 1e3, torch_TFLOPs=flops / tm / 1e12,
            ratio_vs_torch=tm / ours[0])
        del tq, tk, tv


def bench_chunk_at_depth(depths, chunk=2048):
    """The model's prefill step: a chunk at depth, with the per-block expansion, kernel vs plain."""
    w = (mx.random.normal((DL, H * (NOPE + DV))) * 0.05).astype(mx.bfloat16)
    kv, split = _expand_fns(w)
    for S in depths:
        rows = (mx.random.normal((1, S, D)) * 0.5).astype(mx.bfloat16)
        c = cache_of(rows)
        q = (mx.random.normal((1, chunk, H, DK)) * 0.5).astype(mx.bfloat16)
        kern = timeit(lambda: A.mla_prefill_attention(q, c, kv, DK ** -0.5, DR, DV, expand=split), reps=3, warm=1)
        ref = with_ref(lambda: timeit(lambda: A.mla_prefill_attention(q, c, kv, DK ** -0.5, DR, DV, expand=split),
                                      reps=2, warm=1))
        flops = 2 * chunk * (S - chunk / 2) * H * (DK + DV)
        row(bench="chunk_at_depth", chunk=chunk, depth=S, kernel_ms=kern[0] * 1e3, reference_ms=ref[0] * 1e3,
            kernel_attn_TFLOPs=flops / kern[0] / 1e12, speedup=ref[0] / kern[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="mla_device_results.json")
    ap.add_argument("--depths", default="4K,32K,128K")
    ap.add_argument("--prefill", default="32K,128K")
    ap.add_argument("--chunk-depths", default="32K,128K")
    ap.add_argument("--skip", default="", help="comma list of: checks,decode,prefill,chunk")
    ap.add_argument("--prefill-reps", type=int, default=7, help="alternated calls of ours and torch's a length")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    row(info="device", device=str(mx.default_device()), mla_backend=K.backend(), mlx=mx.__version__)
    try:
        if "checks" not in skip:
            for dt in (mx.bfloat16, mx.float32):
                check_decode(dt)
                check_prefill(dt)
        if "decode" not in skip:
            bench_decode(parse_lengths(a.depths), copy_bandwidth())
        if "prefill" not in skip:
            bench_prefill(parse_lengths(a.prefill), a.prefill_reps)
        if "chunk" not in skip:
            bench_chunk_at_depth(parse_lengths(a.chunk_depths))
    finally:
        Path(a.json).write_text(json.dumps(ROWS, indent=1))


if __name__ == "__main__":
    main()
