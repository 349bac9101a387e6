"""The host side of one GPU decode step, measured on a machine without one: the slice model runs
its GPU code path (compiled pieces, kernel launch code, cache logic) with each custom kernel
replaced by a stand-in that returns zeros of the kernel's output shapes. Reports the Python time
to build a greedy step's lazy graph, and the graph's primitives (views, and those that launch work).

    python scripts/decode_host_proxy.py [--tree DIR] [--depth 4096] [--steps 40]

--tree runs another checkout's kimi_mlx / metal_kernels (e.g. `git archive` of an older commit),
so that two versions are compared on one machine. What this can't show: the device's time, and
the cost of a launch on it (the stand-ins are plain MLX ops).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

VIEWS = {"Reshape", "Transpose", "Broadcast", "ExpandDims", "Squeeze", "Slice", "Flatten", "Unflatten",
         "Split", "AsStrided"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--depth", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--experts", type=int, default=16, help="fp32 experts (the CPU's gather_mm takes fp32 only)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    os.environ.setdefault("KIMI_MLX_COMPILE", "on")
    os.environ.setdefault("KIMI_MLX_CPU_FAST", "off")  # the GPU's classes, not the CPU fast path's
    sys.path.insert(0, str(Path(a.tree).resolve()))

    import kimi_mlx  # noqa: F401  (optimized BLAS before mlx.core)
    import mlx.core as mx
    import metal_kernels
    import metal_kernels.mla as mla
    from kimi_mlx.bench import model as mb
    from kimi_mlx.bench.step import ZeroKernel, _graph_ops, _step_outputs

    metal_kernels.backend = lambda: "cuda"
    metal_kernels._kernel = lambda *args, **kw: ZeroKernel()
    mla.backend = lambda: "cuda"
    import kimi_mlx.model.moe as moe
    if hasattr(moe, "_on_gpu"):  # the routing kernel, as on a GPU
        moe._on_gpu = lambda: True
    import kimi_mlx.model.kimi_linear as kl
    if hasattr(kl, "kernels_traceable"):  # a KDA layer's kernel inside its compiled piece, as on a GPU
        kl.kernels_traceable = lambda: True

    c = mb.slice_config(5, a.experts, 8192, False)
    model = mb.build("ours", c, mb.random_weights(c, 0), "fp32")
    from kimi_mlx.ops.cpu_fast import disable_cpu_fast_path

    disable_cpu_fast_path(model)  # the GPU's classes (build turns the CPU fast path on here)
    _, cache, tok = mb.prefill_one("ours", model, 64, 2048, 8192, 0, reserve=a.depth + 256)
    mb.fill_synthetic("ours", model, cache, a.depth, 0)
    for _ in range(5):
        tok = mb.greedy_step("ours", model, cache, tok)

    def build():
        return mx.argmax(mb._logits_last("ours", model, tok, cache), axis=-1)

    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        y = build()
        times.append(time.perf_counter() - t)
        mx.eval(_step_outputs("ours", cache, y))
    ops = _graph_ops(_step_outputs("ours", cache, build()))
    launches = {k: v for k, v in ops.items() if k not in VIEWS}
    out = {"tree": a.tree, "depth": a.depth, "build_ms_median": statistics.median(times) * 1e3,
           "build_ms_min": min(times) * 1e3, "primitives": sum(ops.values()),
           "non_view_primitives": sum(launches.values()), "by_name": dict(ops.most_common())}
    print(f"build {out['build_ms_median']:.3f} ms (min {out['build_ms_min']:.3f}), {out['primitives']} primitives, "
          f"{out['non_view_primitives']} not views")
    print("  " + ", ".join(f"{k} {v}" for k, v in sorted(launches.items(), key=lambda t: -t[1])))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
