"""Where a GPU decode step's time goes: graph build (Python) against evaluation, per layer, and
what a launch costs on this backend.

    python3 scripts/decode_probe.py step [--depth 4096] [--json out.json]
    python3 scripts/decode_probe.py launch [--json out.json]

step: the 5-layer slice (bf16, 256 experts), ours and mlx-lm, a real prefill of --depth tokens, then
40 greedy steps each, split into building the lazy graph and evaluating it (medians); the pipelined
rate; ours' build per layer; the step's primitives; the same step with the custom kernels replaced
by zeros of their output shapes (what the kernels cost in the step).
launch: a custom kernel (mx.fast.cuda_kernel or metal_kernel) called alone and in a chain of 50,
against a built-in op (x + 1) and a view (reshape), in microseconds (median, min).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_mlx  # noqa: F401,E402  (optimized BLAS before mlx.core)
import mlx.core as mx  # noqa: E402

import metal_kernels  # noqa: E402
from kimi_mlx.bench import model as mb  # noqa: E402
from kimi_mlx.bench.step import ZeroKernel, _graph_ops, _step_outputs  # noqa: E402


def med_us(f, n=50, warm=5):
    for _ in range(warm):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e6, 1), round(min(ts) * 1e6, 1)


def launch() -> dict:
    x = mx.zeros((8,), mx.float32)
    mx.eval(x)
    make = mx.fast.cuda_kernel if mx.cuda.is_available() else mx.fast.metal_kernel
    k = make(name="probe_add", input_names=["inp"], output_names=["out"], source="out[0] = inp[0] + 1.0f;")

    def call(a):
        return k(inputs=[a], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(8,)],
                 output_dtypes=[mx.float32])[0]

    def chain(step, n=50):
        y = x
        for _ in range(n):
            y = step(y)
        mx.eval(y + 1)

    return {"custom_synced_us": med_us(lambda: mx.eval(call(x))),
            "custom_chain_us_each": [v / 50 for v in med_us(lambda: chain(call), 20, 3)],
            "add_synced_us": med_us(lambda: mx.eval(x + 1)),
            "add_chain_us_each": [v / 50 for v in med_us(lambda: chain(lambda y: y + 1), 20, 3)],
            "view_chain_us_each": [v / 50 for v in med_us(lambda: chain(lambda y: y.reshape(2, 4).reshape(8)), 20, 3)]}


def step(depth: int) -> dict:
    c = mb.slice_config(5, 256, 8192, False)
    base = mb.random_weights(c, 0)
    res = {}
    for impl in ("ours", "mlx-lm"):
        m = mb.build(impl, c, base, "bf16")
        mb.warm_up(impl, m, mb.warmup_chunk(2048), 8192, 1, 2.0)
        _, cache, tok = mb.prefill_one(impl, m, depth, 2048, 8192, 0)

        def one():
            t0 = time.perf_counter()
            y = mx.argmax(mb._logits_last(impl, m, tok, cache), axis=-1)[:, None]
            t1 = time.perf_counter()
            mx.eval(_step_outputs(impl, cache, y))
            return t1 - t0, time.perf_counter() - t1

        def timed(n=40):
            for _ in range(5):
                one()
            s = [one() for _ in range(n)]
            return {"build_ms": statistics.median(a for a, _ in s) * 1e3,
                    "eval_ms": statistics.median(b for _, b in s) * 1e3,
                    "step_ms": statistics.median(a + b for a, b in s) * 1e3}

        r = timed()
        y = mx.argmax(mb._logits_last(impl, m, tok, cache), axis=-1)[:, None]
        ops = _graph_ops(_step_outputs(impl, cache, y))
        mx.eval(_step_outputs(impl, cache, y))
        r["primitives"], r["ops"] = sum(ops.values()), dict(ops.most_common(40))
        r["pipelined_ms"] = mb.pipelined_decode(impl, m, cache, tok, 32)[0] * 1e3
        if impl == "ours":
            per = collections.defaultdict(list)
            cls = type(m.layers[0])
            plain = cls.__call__

            def layer_timed(self, x, c=None):
                t = time.perf_counter()
                out = plain(self, x, c)
                per[id(self)].append(time.perf_counter() - t)
                return out

            cls.__call__ = layer_timed
            try:
                for _ in range(30):
                    one()
            finally:
                cls.__call__ = plain
            r["layer_build_us"] = [round(statistics.median(per[id(layer)]) * 1e6, 1) for layer in m.layers]

            real = metal_kernels._kernel
            metal_kernels._kernel = lambda *a, **k: ZeroKernel()
            try:
                r["fake_kernels"] = timed()
            finally:
                metal_kernels._kernel = real
        res[impl] = r
        print(impl, json.dumps({k: v for k, v in r.items() if k != "ops"}), flush=True)
        del m, cache
        mx.clear_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("step", "launch"))
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if mx.default_device().type != mx.DeviceType.gpu:
        print("decode_probe: needs a GPU (MLX-CUDA or Metal)", file=sys.stderr)
        return 2
    out = launch() if a.mode == "launch" else step(a.depth)
    if a.mode == "launch":
        print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
