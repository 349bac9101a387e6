"""Every KIMI_MLX_* environment variable, in one table, parsed one way.

`settings()` parses the user settings once per distinct KIMI_MLX_* environment (a changed
variable, e.g. in a test, is seen on the next call). "off" is spelled off/0/false/no/none
everywhere, "on" on/1/true/yes. Kernel tuning knobs are listed here for the README and read
by metal_kernels / the kernel dispatch (they must be changeable per call in benchmarks; a
forward pass reads each once, held_kernel_settings).

This module imports nothing heavy: _blas reads it before mlx.core is loaded.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Optional

OFF = ("off", "0", "false", "no", "none")
ON = ("on", "1", "true", "yes")

# name -> (default, meaning). User settings: what a user sets to change behaviour.
USER_SETTINGS = {
    "KIMI_MLX_HOME": ("platform data dir", "where the chat app keeps chats, sessions and remembered prefill speeds"),
    "KIMI_MLX_CACHE": ("user cache dir", "compiled native code (BLAS shim, KDA C kernel) and prefill speeds"),
    "KIMI_MLX_MODEL": ("mlx-community/Kimi-Linear-48B-A3B-Instruct-4bit", "kimi-chat's default --model"),
    "KIMI_MLX_BLAS": ("auto", "Linux CPU BLAS: off (MLX's reference BLAS), auto, system, scipy, or a library path"),
    "KIMI_MLX_CPU_FAST": ("auto", "CPU fast path (dequantize + BLAS for prefill): off, on, auto"),
    "KIMI_MLX_KDA_CPU": ("on", "the KDA C kernel for CPU prompts: off turns it off"),
    "KIMI_MLX_KDA_THREADS": ("CPUs usable", "threads of the KDA C kernel"),
    "KIMI_MLX_CHECKPOINT_MB": ("2048", "memory kept for conversation checkpoints (turn states); off keeps none"),
    "KIMI_MLX_FAKE_ENGINE": ("off", "kimi-chat with a scripted engine, no model (tests, demos)"),
    "KIMI_MLX_FAKE_DELAY": ("0.01", "seconds between the fake engine's tokens"),
}
# Kernel tuning and debugging, read where the kernels are dispatched (metal_kernels, ops).
KERNEL_SETTINGS = {
    "KIMI_MLX_KDA": ("", "reference: the plain per-token KDA recurrence everywhere (debugging)"),
    "KIMI_MLX_KDA_SPLIT": ("on CUDA, off Metal", "KDA prefill kernel: share intra-chunk work across threadgroups (on/off)"),
    "KIMI_MLX_KDA_BV": ("by shape", "KDA kernels: value-block width"),
    "KIMI_MLX_KDA_LA": ("2 x slices", "KDA prefill kernel: look-ahead chunks"),
    "KIMI_MLX_KDA_PREC": ("by dtype", "KDA kernels: internal precisions"),
    "KIMI_MLX_KDA_NT": ("by backend", "KDA prefill kernel: threads per threadgroup"),
    "KIMI_MLX_KDA_PF": ("on when NT <= 256", "KDA prefill kernel: prefetch (on/off)"),
    "KIMI_MLX_KDA_POISON": ("off", "fill KDA kernel outputs with NaN first (tests: unwritten elements show)"),
    "KIMI_MLX_MLA": ("", "reference: the MLX-ops MLA attention instead of the kernels"),
    "KIMI_MLX_COMPILE": ("on a GPU", "decode steps run as mx.compile'd pieces per layer (fused elementwise ops, no per-token graph build): on, off, auto"),
    "KIMI_MLX_COMPILE_KDA": ("on a GPU with the kernels", "a layer's compiled decode step takes its kernels inside (one piece a layer, not two around them; MLA: the cache write too): on, off, auto"),
    "KIMI_MLX_MLA_NBUF": ("2 on CUDA (bf16)", "MLA kernels: key/value tile buffers (2: async copies overlap the math; 1 on Metal)"),
    "KIMI_MLX_MLA_PREFILL_NW": ("8 CUDA, 4 Metal", "MLA prefill kernel: warps per threadgroup"),
    "KIMI_MLX_MLA_PREFILL_RW": ("2 CUDA where it fits, else 1", "MLA prefill kernel: 16-row query tiles a warp (1 or 2: each key fragment used twice)"),
    "KIMI_MLX_MLA_TGS": ("132 per fitting threadgroup CUDA, 80 Metal", "MLA decode kernel: threadgroups one call aims for (split-K)"),
    "KIMI_MLX_MLA_DECODE_BK": ("64 CUDA with two key buffers, else 32", "MLA decode kernel: keys a tile (32 or 64)"),
    "KIMI_MLX_MLA_DECODE_GROUPS": ("1", "MLA decode kernel: warp groups a threadgroup, each on its own split (1, or 2 on CUDA)"),
    "KIMI_MLX_MLA_DECODE_NW": ("8", "MLA decode kernel: warps a threadgroup (8, or 16 with one warp group)"),
    "KIMI_MLX_MLA_DECODE_BULK": ("0", "MLA decode kernel on CUDA: key tiles by bulk copies on an mbarrier (1) instead of cp.async (0); experimental: slower on an H100, 103 against 84 us at 128K"),
    "KIMI_MLX_MOE_ROUTE": ("", "reference: the MLX-ops MoE routing instead of the one-launch routing kernel"),
    "KIMI_MLX_MOE_STACK": ("on", "a decode token's routed and shared experts as two gathered matmuls over stacked weights (off: the layers one by one)"),
}


def parse_switch(value: Optional[str], default: str = "auto") -> str:
    """'off', 'on', or the value lower-cased and stripped ('auto', a path, a mode name...)."""
    v = (value or "").strip().lower()
    if not v:
        return default
    return "off" if v in OFF else "on" if v in ON else v


def is_off(value: Optional[str]) -> bool:
    return parse_switch(value, "") == "off"


_HELD = threading.local()


@contextlib.contextmanager
def held_kernel_settings():
    """Within it (on this thread), each kernel setting is read from the environment once: a decode
    step's forward pass asks some sixty times, at about a microsecond a read."""
    outer = getattr(_HELD, "values", None)
    if outer is None:
        _HELD.values = {}
    try:
        yield
    finally:
        if outer is None:
            _HELD.values = None


def kernel_setting(name: str) -> Optional[str]:
    """A kernel tuning variable, read on every call (benchmarks change them between calls), or
    once per held_kernel_settings() block."""
    if name not in KERNEL_SETTINGS:
        raise KeyError(f"{name} is not in settings.KERNEL_SETTINGS")
    held = getattr(_HELD, "values", None)
    if held is None:
        return os.environ.get(name) or None
    if name not in held:
        held[name] = os.environ.get(name) or None
    return held[name]


def kernel_switch(name: str, default: str = "") -> str:
    """kernel_setting parsed like every switch: 'on', 'off', or the value (e.g. 'reference')."""
    return parse_switch(kernel_setting(name), default)


def _positive_int(value: Optional[str]) -> Optional[int]:
    v = (value or "").strip()
    return int(v) if v.isdigit() and int(v) > 0 else None


@dataclass(frozen=True)
class Settings:
    home: Optional[str]
    cache_dir: Optional[str]
    model: Optional[str]
    blas: str  # "off" | "auto" | "system" | "scipy" | a path (case kept)
    cpu_fast: str  # "off" | "on" | "auto"
    kda_cpu: bool
    kda_reference: bool
    kda_threads: Optional[int]
    checkpoint_bytes: int
    fake_engine: bool
    fake_delay: float

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        g = lambda k: env.get(k) or None  # noqa: E731
        blas = (env.get("KIMI_MLX_BLAS") or "auto").strip()
        if parse_switch(blas) in ("off", "reference"):
            blas = "off"
        elif blas.lower() in ("auto", "system", "scipy", ""):
            blas = blas.lower() or "auto"
        ckpt = env.get("KIMI_MLX_CHECKPOINT_MB")
        mb = 0 if is_off(ckpt) else _float(ckpt, 2048.0)
        return cls(
            home=g("KIMI_MLX_HOME"), cache_dir=g("KIMI_MLX_CACHE"), model=g("KIMI_MLX_MODEL"), blas=blas,
            cpu_fast=parse_switch(env.get("KIMI_MLX_CPU_FAST")),
            kda_cpu=not is_off(env.get("KIMI_MLX_KDA_CPU")),
            kda_reference=parse_switch(env.get("KIMI_MLX_KDA"), "") == "reference",
            kda_threads=_positive_int(env.get("KIMI_MLX_KDA_THREADS")),
            checkpoint_bytes=int(max(mb, 0) * 2**20),
            fake_engine=parse_switch(env.get("KIMI_MLX_FAKE_ENGINE"), "off") != "off",
            fake_delay=max(_float(env.get("KIMI_MLX_FAKE_DELAY"), 0.01), 0.0),
        )


def _float(value: Optional[str], default: float) -> float:
    try:
        return float(value) if value and value.strip() else default
    except ValueError:
        return default


_cached: tuple = (None, None)


_USER_NAMES = tuple(USER_SETTINGS) + ("KIMI_MLX_KDA",)
_USER_KEYS = tuple(os.fsencode(k) for k in _USER_NAMES)


def _env_key() -> tuple:
    """The values of the variables Settings reads. It runs on hot paths (the KDA dispatch asks once
    a layer and token): os.environ's own lookups encode every key (~0.7 us each), its bytes
    mapping on POSIX doesn't."""
    data = getattr(os.environ, "_data", None)
    if os.name == "posix" and isinstance(data, dict):
        return tuple(map(data.get, _USER_KEYS))
    return tuple(map(os.environ.get, _USER_NAMES))


def settings() -> Settings:
    """The user settings of the current environment (parsed again only when one of its variables changed)."""
    global _cached
    key = _env_key()
    if _cached[0] != key:
        _cached = (key, Settings.from_env())
    return _cached[1]


def table_markdown() -> str:
    """The README's table of variables."""
    rows = ["| variable | default | what |", "|---|---|---|"]
    for title, table in (("user", USER_SETTINGS), ("kernel tuning", KERNEL_SETTINGS)):
        for k, (default, what) in table.items():
            rows.append(f"| `{k}` | {default} | {what} ({title}) |")
    return "\n".join(rows)
