"""Decode speed and memory of a pipeline against one process, on one host.

    python -m kimi_mlx.distributed.bench --model tiny --ranks 2
    python -m kimi_mlx.distributed.bench --model slice --ranks 2 --tokens 32

tiny: tests/fixtures/models/tiny_chat. slice: the real widths (hidden 2304, 32 heads, experts of
1024) with 6 layers, 8 experts and a vocabulary of 8192, random weights, converted to 4 bits
(built once into --work-dir). Both runs take the same code path (a chunked prefill, then the
decode loop generation uses, greedy), one process first, then `mlx.launch -n RANKS --backend ring`
on localhost; each measures decode tokens/s `--repeats` times after a warm-up. Memory per rank:
the bytes of the weights it holds and MLX's peak; the target is single-process weights / N + 10%.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "models" / "tiny_chat"
SLICE = {"layers": 6, "experts": 8, "vocab": 8192}


def _weights_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(a.nbytes for _, a in tree_flatten(module.parameters()))


def measure(model, prompt_tokens: int, tokens: int, repeats: int, vocab: int) -> dict:
    """Prefill `prompt_tokens` random ids, then decode `tokens` greedily, `repeats` times from the
    same prefilled state (after one warm-up run): tokens/s of each."""
    import mlx.core as mx

    from ..generate import _token_steps
    from ..sampling import make_sampler
    from ..session import prefill

    ids = mx.random.randint(0, vocab, (prompt_tokens,), key=mx.random.key(0)).tolist()
    cache, logits = prefill(model, ids, model.make_cache(), step=256, return_logits=True)
    runs = []
    tokens_out = None
    for r in range(repeats + 1):
        c = cache.copy()
        c.reserve(prompt_tokens + tokens + 1)
        t0 = time.perf_counter()
        out = [t for t, _ in _token_steps(model, c, logits, mx.array([], dtype=mx.int32), make_sampler(0.0), [],
                                          tokens)]
        dt = time.perf_counter() - t0
        tokens_out = out
        if r:  # the first is the warm-up
            runs.append(tokens / dt)
    return {"tok_s": runs, "tokens": tokens_out, "peak_bytes": mx.get_peak_memory()}


def worker(args) -> int:
    """One process (not launched) or one rank (launched): print one JSON line."""
    import kimi_mlx  # noqa: F401  (BLAS before mlx.core)
    import mlx.core as mx

    from . import start

    pipe = start(args.split)
    if pipe is None:
        from ..weights import load_model

        model = load_model(args.path)
        load_peak = mx.get_peak_memory()
        res = measure(model, args.prompt_tokens, args.tokens, args.repeats, model.config.vocab_size)
        print(json.dumps({"rank": None, "weights_bytes": _weights_bytes(model), "load_peak_bytes": load_peak,
                          **res}), flush=True)
        return 0
    model, _ = pipe.load(args.path, tokenizer=False)
    part = pipe.stage
    info = {"rank": pipe.rank, "weights_bytes": _weights_bytes(part), "load_peak_bytes": mx.get_peak_memory(),
            "layers": [part.stage_layers.start, part.stage_layers.stop], "split": pipe.counts}
    if not pipe.leader:
        pipe.follow()
        print(json.dumps({**info, "peak_bytes": mx.get_peak_memory()}), flush=True)
        return 0
    try:
        res = measure(model, args.prompt_tokens, args.tokens, args.repeats, model.config.vocab_size)
    finally:
        pipe.close()
    print(json.dumps({**info, **res}), flush=True)
    return 0


def build_slice(work: Path) -> Path:
    """The slice checkpoint (4-bit, two shards), built once into work/slice-q4."""
    dst = work / "slice-q4"
    if (dst / "config.json").exists():
        return dst
    import kimi_mlx  # noqa: F401
    import mlx.core as mx

    from ..bench.slice import random_weights, slice_config
    from ..convert import convert

    src = work / "slice-src"
    src.mkdir(parents=True, exist_ok=True)
    c = slice_config(SLICE["layers"], SLICE["experts"], SLICE["vocab"])
    w = {k: (v if k.endswith(("A_log", "dt_bias", "e_score_correction_bias")) else v.astype(mx.bfloat16))
         for k, v in random_weights(c).items()}
    mx.save_safetensors(str(src / "model.safetensors"), w)
    (src / "config.json").write_text(json.dumps(c))
    del w
    convert(src, dst, quantize=True, q_bits=4, max_shard_size="200MB", check_memory=False)
    return dst


def free_port(n: int) -> int:
    """A base port with n free ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _run(cmd: list[str], timeout: float) -> list[dict]:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return rows


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{xs[len(xs) // 2]:.1f} tok/s (min {xs[0]:.1f}, max {xs[-1]:.1f}, n={len(xs)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_mlx.distributed.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, slice, or a model directory")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--split", default=None, help="layers per rank (default: chosen by the planner)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work-dir", default=None, help="where the slice checkpoint is built (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kimi-dist-bench-"))
    path = TINY if args.model == "tiny" else build_slice(work) if args.model == "slice" else Path(args.model)
    common = [sys.executable, "-m", "kimi_mlx.distributed.bench", "--worker", "--path", str(path),
              "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    one = _run(common, 3600)[0]
    launch = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(args.ranks), "--backend", "ring",
              "--starting-port", str(free_port(args.ranks)), "--"]
    ranks = sorted(_run(launch + common + (["--split", args.split] if args.split else []), 3600),
                   key=lambda r: r["rank"])
    lead = ranks[0]
    same = lead["tokens"] == one["tokens"]
    ratio = sorted(lead["tok_s"])[len(lead["tok_s"]) // 2] / sorted(one["tok_s"])[len(one["tok_s"]) // 2]
    share = one["weights_bytes"] / args.ranks
    print(f"model {path.name if args.model not in ('tiny', 'slice') else args.model}: {args.prompt_tokens}-token "
          f"prompt, {args.tokens} decode tokens, {args.repeats} runs, {os.cpu_count()} CPUs")
    print(f"  one process: {_stats(one['tok_s'])}; weights {one['weights_bytes'] / 1e6:.1f} MB")
    print(f"  {args.ranks} ranks (split {','.join(map(str, lead['split']))}): {_stats(lead['tok_s'])}; "
          f"{ratio:.2f}x one process (target >= 0.8); same tokens: {same}")
    for r in ranks:
        print(f"    rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, weights "
              f"{r['weights_bytes'] / 1e6:.1f} MB = {r['weights_bytes'] / share:.2f} x (one process / {args.ranks}) "
              f"(target <= 1.10); MLX peak {r['peak_bytes'] / 1e6:.1f} MB")
    print(f"  per-token overhead: {1e3 / (sorted(lead['tok_s'])[len(lead['tok_s']) // 2]) - 1e3 / sorted(one['tok_s'])[len(one['tok_s']) // 2]:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "one": one, "ranks": ranks, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
