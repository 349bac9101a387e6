"""The KDA decode kernel with the short convs inside (KC), and with the second low-rank
projections of f and the gate too (LR, gated only), against the same step unfused: the model's
MLX-ops conv (causal_short_conv) and matmuls, then the kernel without them (checked against FLA
by scripts/kda_device_check.py). Real shapes (H 32, K = V 128, KC 4), batch 1 and 3, bf16 and
fp32, on this machine's GPU.

    python3 scripts/kda_conv_device_check.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402  (optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

import metal_kernels as mk  # noqa: E402
from kimi_mlx.model.kda import causal_short_conv  # noqa: E402


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return float(mx.abs(a - b).max() / mx.maximum(mx.abs(b).max(), 1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    H, K, V, KC = 32, 128, 128, 4
    C = H * (2 * K + V)
    rows, ok = [], True
    for B in (1, 3):
        for dt in (mx.bfloat16, mx.float32):
            for gated, low in ((False, False), (True, False), (True, True)):
                mx.random.seed(B * 10 + gated)
                x = mx.random.normal((B, 1, C)).astype(dt)
                cs = mx.random.normal((B, KC - 1, C)).astype(dt)
                w = (0.5 * mx.random.normal((C, KC))).astype(dt)
                f = mx.random.normal((B, 1, H, K)).astype(dt)
                b = mx.random.normal((B, 1, H)).astype(dt)
                dtb, A_log = 0.5 * mx.random.normal((H * K,)), mx.log(mx.random.uniform(1, 16, (H,)))
                S0 = mx.random.normal((B, H, K, V))
                nw = (mx.random.uniform(0.5, 1.5, (V,))).astype(dt) if gated else None
                gate = mx.random.normal((B, 1, H, V)).astype(dt) if gated else None
                kw = {}
                f_in, gate_in = f, gate
                if low:  # f and gate from their first projections [B, 1, K] and the dense second ones
                    f_in, g_a = (mx.random.normal((B, 1, K)).astype(dt) for _ in range(2))
                    f_w, g_w = ((0.2 * mx.random.normal((H * n, K))).astype(dt) for n in (K, V))
                    # the reference products on the CPU: MLX-CUDA's fp32 matmul of more than one row is
                    # TF32 (3.8e-4 relative on the H100 at 3 rows; 9.5e-8 at one)
                    f, gate = (mx.matmul(f_in, f_w.T, stream=mx.cpu).reshape(B, 1, H, K),
                               mx.matmul(g_a, g_w.T, stream=mx.cpu).reshape(B, 1, H, V))
                    gate_in, kw["low_rank"] = g_a, (f_w, g_w)
                qkv, cs_ref = causal_short_conv(x, w, cs)
                P = H * K
                q, k, v = (qkv[..., i * P:(i + 1) * P].reshape(B, 1, H, K) for i in range(3))
                o_ref, S_ref = mk.kda_decode_step_fused(q, k, v, f, dtb, A_log, b, S0, nw, gate, 1e-5)
                o, S, cs_out = mk.kda_decode_step_fused(x, None, None, f_in, dtb, A_log, b, S0, nw, gate_in, 1e-5,
                                                        conv=(cs, w), **kw)
                mx.eval(o, S, cs_out, o_ref, S_ref, cs_ref)
                r = dict(B=B, dtype=str(dt), gated=gated, low_rank=low, rel_o=rel(o, o_ref), rel_S=rel(S, S_ref),
                         conv_state_equal=bool(mx.array_equal(cs_out, cs_ref)))
                tol = 2e-2 if dt == mx.bfloat16 else 1e-5
                r["pass"] = r["rel_o"] < tol and r["rel_S"] < tol and r["conv_state_equal"]
                ok &= r["pass"]
                rows.append(r)
                print(json.dumps(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print("all pass" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
