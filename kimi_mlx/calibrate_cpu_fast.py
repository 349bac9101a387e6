"""When the CPU fast path pays: quantized matmul vs dequantize + BLAS, by rows, for a few shapes.

    python -m kimi_mlx.calibrate_cpu_fast

The numbers behind ops/cpu_fast.py's LINEAR_MIN_ROWS and SWITCH_MIN_PAIRS. Lives outside ops
so that ops import neither the model nor the benchmarks.
"""
from __future__ import annotations

import mlx.core as mx

from .bench import best_seconds
from .ops.cpu_fast import dequantize_fp32


def calibrate(shapes=((4096, 2304), (2304, 4096), (1024, 2304)), rows=(1, 2, 4, 8, 16, 32, 64, 128),
              group_size: int = 64, bits: int = 4, reps: int = 3):
    def best(f):
        return best_seconds(f, reps)

    print(f"{'out x in':>12} {'rows':>5} {'qmm ms':>9} {'deq+BLAS ms':>12} {'fp32 ms':>9} {'bf16 ms':>9} {'bf16->fp32 ms':>14}")
    for O, I in shapes:
        w = mx.random.normal((O, I)) * 0.02
        wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
        wb = w.astype(mx.bfloat16)
        mx.eval(w, wq, s, b, wb)
        for r in rows:
            x = mx.random.normal((r, I))
            mx.eval(x)
            tq = best(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=group_size, bits=bits))
            td = best(lambda: x @ dequantize_fp32(wq, s, b, group_size, bits).T)
            tf = best(lambda: x @ w.T)
            tb = best(lambda: x.astype(mx.bfloat16) @ wb.T)
            tc = best(lambda: x @ wb.astype(mx.float32).T)
            print(f"{O:>5} x {I:<5} {r:>5} {tq * 1e3:9.2f} {td * 1e3:12.2f} {tf * 1e3:9.2f} {tb * 1e3:9.2f} {tc * 1e3:14.2f}")


if __name__ == "__main__":
    calibrate()
