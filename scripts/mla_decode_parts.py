"""The MLA decode kernel's two launches timed apart on the device: the split-K partials and the
combine, at the real widths, bf16, one cache segment; and both together, 16 calls a graph.

    python scripts/mla_decode_parts.py --depths 32K,128K --json out/parts.json

The copy bandwidth (x + 1 over 2 GiB of bf16) is measured in the same run; each line gives the
cache read rate as a share of it.

--probe loads|math times a diagnostic build of the partials kernel instead (its results are
garbage): `loads` keeps the key tile loads and drops the math, `math` keeps the math on whatever the
tiles hold and drops every load after the first tile. Which of the two is close to the real kernel's
time says what bounds it.

--launches N runs no timing: N launches each of the partials, the combine and the copy, one at a
time, for a profiler to time on the device (what the tenth session reported):

    ncu --clock-control none --section SpeedOfLight python scripts/mla_decode_parts.py --depths 128K --launches 3
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

from kimi_mlx.bench.common import fmt_len, parse_lengths  # noqa: E402
from kimi_mlx.bench.roofline import copy_bandwidth  # noqa: E402
from kimi_mlx.settings import held_kernel_settings  # noqa: E402
from metal_kernels import mla as K  # noqa: E402
from metal_kernels import mla_template  # noqa: E402


def probe_body(body: str, probe: str) -> str:
    """DECODE_BODY with the math (`loads`) or the streamed tile loads (`math`) cut out."""
    if probe == "loads":
        a = body.index("    {  // S = Q K^T")
        b = body.index("  }\n  MLA_GBAR();\n  const long obase")  # the end of the key loop
        return body[:a] + body[b:]
    if probe == "math":
        load = ("mla_decode_tile<ST, T, D, DQ, BK, NT>(TILE_PTR(ST, sKb, ((it + 1) % NBUF) * KF), rows, rbase, "
                "k0 + BK, k_hi, gt);")
        assert load in body
        return body.replace(load, "{}")
    raise ValueError(probe)


def _case(n: int, H: int, D: int):
    """(cached rows [1, n, D], queries [1, H, D]) in bf16."""
    rows = mx.random.normal((1, n, D)).astype(mx.bfloat16)
    q = mx.random.normal((1, H, D)).astype(mx.bfloat16)
    mx.eval(rows, q)
    return rows, q


def timed(f, reps=20, per=16):
    """Median, min and max microseconds a call, `per` calls an evaluation. Each call is queued as
    soon as it is built (async_eval) and the kernel settings are read once, as in a forward pass,
    so the host side of a call (26 us on a 2-core EPYC, 12 with the settings held) overlaps the
    previous call's kernel instead of adding to it. --launches under a profiler gives the device time."""
    with held_kernel_settings():
        for _ in range(3):
            mx.eval(f())
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            outs = []
            for _ in range(per):
                outs.append(f())
                mx.async_eval(outs[-1])
            mx.eval(outs)
            ts.append((time.perf_counter() - t) / per * 1e6)
    return statistics.median(ts), min(ts), max(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="32K,128K")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--per", type=int, default=16, help="calls an evaluation")
    ap.add_argument("--launches", type=int, default=0,
                    help="no timing: this many launches of each kernel and of the copy, for a profiler")
    ap.add_argument("--probe", choices=("loads", "math"), default=None,
                    help="time a diagnostic build of the partials kernel (see the module doc)")
    a = ap.parse_args()
    if a.probe:
        mla_template._BODIES["mla_decode"] = probe_body(mla_template.DECODE_BODY, a.probe)
    if K.backend() is None:
        raise SystemExit("no MLA kernel on this device (it needs Metal or CUDA; KIMI_MLX_MLA=reference turns them off)")
    H, D, DV = 32, 576, 512
    if a.launches:
        return launches(a.depths, a.launches, H, D, DV)
    copy = copy_bandwidth(2048, mx.bfloat16, reps=10)
    copy_gbps = copy["GBps_median"]
    print(f"copy: {copy['op']}: {copy_gbps:.0f} GB/s (median), {copy['GBps_best']:.0f} best", flush=True)
    out = [{"device": str(mx.default_device()), "mlx": mx.__version__, "copy": copy, "probe": a.probe, "per": a.per,
            "settings": {k: v for k, v in os.environ.items() if k.startswith("KIMI_MLX_")}}]
    for n in parse_lengths(a.depths):
        d = fmt_len(n)
        rows, q = _case(n, H, D)
        part = lambda: K.mla_decode_partial(q, rows, n, 0, n - 1, H, 0.07, DV)  # noqa: E731
        o, lse = part()
        mx.eval(o, lse)
        comb = lambda: K.mla_combine([(o, lse)], mx.bfloat16)  # noqa: E731
        both = lambda: K.mla_combine([part()], mx.bfloat16)  # noqa: E731
        gb = n * D * 2 / 1e9
        for name, f in (("partials", part), ("combine", comb), ("both", both)):
            med, lo, hi = timed(f, per=a.per)
            bw = gb / (med * 1e-6)
            print(f"depth {d}: {name:9s} {med:8.1f} us [{lo:.1f}-{hi:.1f}]  splits {o.shape[1]}"
                  + (f"  cache {bw:.0f} GB/s = {100 * bw / copy_gbps:.1f} % of copy" if name != "combine" else
                     f"  partials {o.nbytes / 1e6:.1f} MB"), flush=True)
            out.append({"depth": n, "part": name, "us_median": med, "us_min": lo, "us_max": hi, "splits": o.shape[1],
                        "cache_GBps": bw if name != "combine" else None,
                        "share_of_copy": bw / copy_gbps if name != "combine" else None})
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))


def launches(depths: str, count: int, H: int, D: int, DV: int) -> None:
    """`count` rounds of one partials, one combine and one copy (x + 1 over 2 GiB of bf16, as
    copy_bandwidth), each evaluated alone, after a round that compiles them."""
    x = mx.zeros((1 << 30,), dtype=mx.bfloat16)
    mx.eval(x)
    for n in parse_lengths(depths):
        rows, q = _case(n, H, D)
        for _ in range(count + 1):
            o, lse = K.mla_decode_partial(q, rows, n, 0, n - 1, H, 0.07, DV)
            mx.eval(o, lse)
            mx.eval(K.mla_combine([(o, lse)], mx.bfloat16))
            mx.eval(x + 1)
        print(f"depth {fmt_len(n)}: {count} launches of each after one round of warm-up", flush=True)


if __name__ == "__main__":
    main()
