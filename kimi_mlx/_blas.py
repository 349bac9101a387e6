"""Load an optimized BLAS before mlx.core on Linux (the mlx-cpu wheel links the reference BLAS).

Set KIMI_MLX_BLAS=off to disable, or KIMI_MLX_BLAS=/path/to/libopenblas.so to choose the library.
"""
from __future__ import annotations

import ctypes
import os
import sys

LOADED: str | None = None
_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def preload() -> str | None:
    global LOADED
    if LOADED is not None or not sys.platform.startswith("linux"):
        return LOADED
    choice = os.environ.get("KIMI_MLX_BLAS", "auto")
    if choice.lower() in ("off", "0", "none", "false"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: mlx already bound its BLAS symbols
    candidates = [choice] if choice not in ("auto", "") else list(_SYSTEM_CANDIDATES)
    for path in candidates:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            LOADED = path
            return LOADED
    return None
