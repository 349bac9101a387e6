"""Dispatch `python -m kimi_mlx.bench <name> [args]` to kimi_mlx.bench.<name>.main(argv)."""
from __future__ import annotations

import importlib
import sys

BENCHES = {
    "kda": "KDA operator: prefill and decode step, ours vs MLX builtin vs mlx-lm",
    "model": "model slice: prefill/decode, ours vs mlx-lm",
    "step": "one decode step of the slice, part by part (embedding, attention, MoE, head, sampling, cache)",
    "mla": "MLA attention kernels: decode cache-read bandwidth, prefill TFLOP/s (vs torch SDPA on CUDA)",
    "roofline": "memory-bandwidth / compute roofline of the device",
}


def _usage() -> str:
    lines = ["usage: python -m kimi_mlx.bench <benchmark> [options]", "", "benchmarks:"]
    lines += [f"  {name:10s} {desc}" for name, desc in BENCHES.items()]
    lines += ["", "Run `python -m kimi_mlx.bench <benchmark> --help` for its options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"unknown benchmark {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    modname = f"kimi_mlx.bench.{name}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise  # a real missing dependency inside the module
        print(f"benchmark {name!r} is not available yet ({modname} is missing)", file=sys.stderr)
        return 2
    try:
        return int(mod.main(rest) or 0)
    except MemoryError as e:  # a benchmark that would not fit this machine says so and stops
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
