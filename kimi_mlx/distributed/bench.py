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


def start_local_ranks(n: int, args: list[str], workdir: Path, **popen) -> list[subprocess.Popen]:
    """`python ARGS` as n ranks of a ring on localhost, started as mlx.launch starts them (MLX_RANK and
    a ring hostfile in MLX_HOSTFILE) but without its output relay, whose threads keep a core busy
    (they select() on the ranks' stdin pipes, which are always writable)."""
    base = free_port(n)
    hostfile = workdir / f"hosts-{base}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    env = dict(popen.pop("env", None) or os.environ)
    return [subprocess.Popen([sys.executable, *map(str, args)], env=dict(env, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)),
                             **popen) for r in range(n)]


def _rows(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _run_one(args: list[str], timeout: float) -> dict:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not _rows(r.stdout):
        raise RuntimeError(f"one process failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return _rows(r.stdout)[0]


def _run_ranks(n: int, args: list[str], how: str, work: Path, timeout: float) -> list[dict]:
    if how == "mlx.launch":
        cmd = [str(Path(sys.executable).with_name("mlx.launch")), "-n", str(n), "--backend", "ring",
               "--starting-port", str(free_port(n)), "--", sys.executable, *args]
        # stdin as from a terminal (open, idle): at end of file mlx.launch's own input loop spins a core
        idle, keep = os.pipe()
        try:
            r = subprocess.run(cmd, stdin=idle, capture_output=True, text=True, timeout=timeout)
        finally:
            os.close(idle)
            os.close(keep)
        out, err = r.stdout, r.stderr
    else:
        procs = start_local_ranks(n, args, work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = [p.communicate(timeout=timeout) for p in procs]
        out, err = "\n".join(o for o, _ in outs), "\n".join(e for _, e in outs)
    rows = sorted(_rows(out), key=lambda x: x["rank"])
    if len(rows) != n:
        raise RuntimeError(f"{n} ranks ({how}) failed:\n{err[-3000:]}")
    return rows


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return f"{_median(xs):.2f} tok/s (min {xs[0]:.2f}, max {xs[-1]:.2f}, n={len(xs)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi_mlx.distributed.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny, slice, or a model directory")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--split", default=None, help="layers per rank (default: chosen by the planner)")
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--repeats", type=int, default=3, help="measurements per process (after a warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="one process and the pipeline, alternated, this many times")
    p.add_argument("--launchers", default="direct,mlx.launch",
                   help="how the ranks start: direct (as mlx.launch, without its relay), mlx.launch")
    p.add_argument("--work-dir", default=None, help="where the slice checkpoint is built (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kimi-dist-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    path = TINY if args.model == "tiny" else build_slice(work) if args.model == "slice" else Path(args.model)
    common = ["-m", "kimi_mlx.distributed.bench", "--worker", "--path", str(path), "--prompt-tokens",
              str(args.prompt_tokens), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    launchers = args.launchers.split(",")
    one, piped = [], {h: [] for h in launchers}
    for _ in range(args.rounds):
        one.append(_run_one(common, 3600))
        for how in launchers:
            piped[how].append(_run_ranks(args.ranks, common + (["--split", args.split] if args.split else []), how,
                                         work, 3600))
    single = [x for r in one for x in r["tok_s"]]
    print(f"model {args.model}: {args.prompt_tokens}-token prompt, {args.tokens} greedy decode tokens, "
          f"{args.rounds} rounds x {args.repeats} runs, {os.cpu_count()} CPUs, ranks on this host")
    print(f"  one process: {_stats(single)}; weights {one[0]['weights_bytes'] / 1e6:.1f} MB")
    report = {"args": vars(args), "one": one, "pipeline": piped}
    for how, runs in piped.items():
        lead = [x for r in runs for x in r[0]["tok_s"]]
        ratio = _median(lead) / _median(single)
        same = all(r[0]["tokens"] == one[0]["tokens"] for r in runs)
        overhead = 1e3 / _median(lead) - 1e3 / _median(single)
        print(f"  {args.ranks} ranks via {how} (split {','.join(map(str, runs[0][0]['split']))}): {_stats(lead)}; "
              f"{ratio:.2f}x one process (target >= 0.8); {overhead:+.2f} ms a token; same tokens: {same}")
        report[f"ratio_{how}"] = ratio
        report[f"overhead_ms_{how}"] = overhead
    share = one[0]["weights_bytes"] / args.ranks
    for r in next(iter(piped.values()))[0]:
        print(f"    rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, weights "
              f"{r['weights_bytes'] / 1e6:.1f} MB = {r['weights_bytes'] / share:.2f} x (one process / {args.ranks}) "
              f"(target <= 1.10); MLX peak {r['peak_bytes'] / 1e6:.1f} MB (one process: "
              f"{one[0]['peak_bytes'] / 1e6:.1f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
