"""Benchmarks: `python -m kimi_mlx.bench {kda,model,step,mla,roofline} [options]` (each has --help).

Every timing goes through `time_runs` (one place for warm-up, synchronisation and statistics)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timing:
    """Wall seconds of the timed runs (warm-up excluded), this process's CPU seconds in them (tells
    load on a shared machine apart), and `out`, the last run's result."""

    times: list[float]
    out: object = field(default=None, repr=False)
    cpu: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        xs = sorted(self.times)
        return xs[len(xs) // 2]

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    def ms(self) -> dict:
        """Median and spread in milliseconds, for the JSON."""
        return {"ms_median": self.median * 1e3, "ms_min": self.min * 1e3, "ms_max": self.max * 1e3,
                "repeats": len(self.times)}

    def fmt(self) -> str:
        return f"{self.median * 1e3:9.3f} ms [{self.min * 1e3:.3f}-{self.max * 1e3:.3f}]"


def _mx_eval(out) -> None:
    import mlx.core as mx

    if out is not None:
        mx.eval(out)


def time_runs(f, reps: int = 5, warmup: int = 1, finish=None, prepare=None, budget: float | None = None) -> Timing:
    """Time `finish(f())` (default: mx.eval of what f returns) `reps` times after `warmup` untimed runs.

    prepare(): untimed, before every run (e.g. reset a state f mutates, or a device sync). budget:
    stop early once the timed runs have taken this many seconds (at least one run is always kept)."""
    finish = finish or _mx_eval
    out = None
    for _ in range(warmup):
        if prepare:
            prepare()
        out = f()
        finish(out)
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    for _ in range(max(1, reps)):
        if prepare:
            prepare()
        t, c = time.perf_counter(), time.process_time()
        res = f()
        finish(res)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        out = res
        if budget is not None and time.perf_counter() - start > budget:
            break
    return Timing(times, out, cpu)


def time_torch_cuda(f, torch, reps: int = 5, warmup: int = 1, budget: float | None = None) -> Timing:
    """time_runs for torch CUDA work: the device is synchronised before each run and to end it."""
    def sync(_=None):
        torch.cuda.synchronize()

    return time_runs(f, reps, warmup, finish=sync, prepare=sync, budget=budget)


def best_seconds(f, reps: int = 5) -> float:
    """Best wall time of evaluating f() over `reps` runs, after one warm-up run."""
    return time_runs(f, reps).min
