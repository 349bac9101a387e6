"""What a decode step's info array costs on a GPU: one MLA decode (split-K partials and combine) at
one depth, bf16, at the real widths, evaluated alone each call and timed on the host (launch to
result), three ways of passing the per-call ints:

- fixed: the same info array every call (the same depth);
- vary: a new host-made info array each call (a new depth each call; what decode did before
  metal_kernels.StepInfo);
- table: the same depths, their ints read as rows of one GPU-resident table (what StepInfo does).

    python scripts/mla_info_probe.py [--depth 128K] [--calls 260] [--rounds 3]

Prints each mode's median and p10 / p90 over the rounds (the first 60 calls of each round are
warm-up) and the largest difference between the vary and table outputs (0: same kernel, same ints).
Needs a GPU backend (MLX-CUDA or Metal)."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kimi_mlx  # noqa: E402,F401  (loads the BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

from kimi_mlx.bench.common import parse_lengths  # noqa: E402
from metal_kernels import mla as K  # noqa: E402

H, D, DV, SCALE, RING = 32, 576, 512, 0.07, 200


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", default="128K")
    p.add_argument("--calls", type=int, default=260)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    (n,) = parse_lengths(a.depth)
    if K.backend() is None:
        print("no MLA kernel backend here (needs a GPU)", file=sys.stderr)
        return 1
    rows = mx.random.normal((1, n + RING, D)).astype(mx.bfloat16)
    q = mx.random.normal((1, H, D)).astype(mx.bfloat16)
    mx.eval(rows, q)
    launch, kps = K.mla_decode_launch(rows, 1, H, D, DV, n)
    table = mx.array([[n - j, 0, n - j - 1, H, kps] for j in range(RING)], dtype=mx.int32)
    mx.eval(table)

    def call(mode, i):
        if mode == "fixed":
            part = K.mla_decode_partial(q, rows, n, 0, n - 1, H, SCALE, DV)
        elif mode == "vary":
            m = n - i % RING
            part = K.mla_decode_partial(q, rows, m, 0, m - 1, H, SCALE, DV)
        else:
            part = K.mla_decode_run(launch, q, rows, table[i % RING], SCALE)
        return K.mla_combine([part], mx.bfloat16)

    x, y = call("vary", 7), call("table", 7)
    diff = mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max().item()
    print(f"depth {n}: vary vs table max |diff| {diff}")
    res: dict[str, list[float]] = {}
    for _ in range(a.rounds):
        for mode in ("fixed", "vary", "table"):
            ts = []
            for i in range(a.calls):
                t = time.perf_counter()
                mx.eval(call(mode, i))
                ts.append((time.perf_counter() - t) * 1e6)
            res.setdefault(mode, []).extend(ts[60:])
    for mode, ts in res.items():
        s = sorted(ts)
        print(f"{mode}: median {statistics.median(ts):.1f} us, p10 {s[len(s) // 10]:.1f}, "
              f"p90 {s[9 * len(s) // 10]:.1f} (n {len(s)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
