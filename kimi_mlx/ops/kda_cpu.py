"""KDA on the CPU through our own C kernel (kda_cpu.c): build on first use, load, call.

    kda_cpu(q, k, v, g, beta, scale=None, initial_state=None) -> (o, state) or None
        same interface and maths as kda_chunked (the chunk scan, threaded over heads); None when
        the kernel is unavailable or off.
    kda_cpu_info() -> dict: whether it is available, where the library is, why not.

The source ships in the package. On first use it is compiled with the system C compiler
(`-O3 -march=native`, then weaker flag sets if the compiler refuses) into
`<cache>/kernels/kda_cpu-<hash>.so`, the hash covering the source, the compiler, the flags and the
CPU (a -march=native build only runs on CPUs like this one); <cache> is KIMI_MLX_CACHE or the user
cache dir. The cached file is loaded only after `_native.cached_library` has verified it. Nothing here raises: no compiler, a failed build or an unknown architecture leave
`kda_cpu` returning None, and `ops.kda.kda` runs the MLX-ops chunked form instead.

KIMI_MLX_KDA_CPU=off disables the kernel (KIMI_MLX_KDA=reference disables it too);
KIMI_MLX_KDA_THREADS sets its thread count (default: the CPUs this process may run on).
"""
from __future__ import annotations

import ctypes
import os
import platform
import threading

import mlx.core as mx
import numpy as np

from .. import _native
from ..settings import settings

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kda_cpu.c")
_ABI = 1
_FLAG_SETS = (["-O3", "-march=native"], ["-O3", "-mcpu=native"], ["-O3"])
_BASE_FLAGS = ["-std=gnu11", "-pthread"]
_ARCHES = ("x86_64", "amd64", "aarch64", "arm64")

_lock = threading.Lock()
_lib = None
_info: dict = {"available": False, "reason": "not loaded yet", "path": None}
_tried = False


def enabled() -> bool:
    """False when switched off by KIMI_MLX_KDA_CPU=off or KIMI_MLX_KDA=reference."""
    s = settings()
    return s.kda_cpu and not s.kda_reference


def _threads() -> int:
    if settings().kda_threads:
        return settings().kda_threads
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _build() -> tuple[_native.Library | None, str]:
    """The verified kernel library (cached or newly compiled), held open, or (None, why not)."""
    machine = platform.machine().lower()
    if machine not in _ARCHES:
        return None, f"unsupported architecture {platform.machine()!r}"
    try:
        with open(_SOURCE, "rb") as f:
            src = f.read()
    except OSError as e:
        return None, f"kernel source missing: {e}"
    cc = _native.compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc, clang or $CC)"
    d, note = _native.private_dir("kernels")
    why = []
    for flags in _FLAG_SETS:
        flags = flags + _BASE_FLAGS
        key = _native.digest(str(_ABI), src.hex(), _native.file_id(cc), " ".join(flags), _native.cpu_signature())
        lib, how = _native.cached_library(os.path.join(d, f"kda_cpu-{key}.so"), key,
                                          lambda tmp, flags=flags: _native.compile_shared(cc, _SOURCE, tmp, flags))
        if lib is not None:
            return lib, f"{how}; {note}" if note else how
        why.append(how)
    return None, "; ".join(why)


def _load():
    """The loaded library, or None (the reason is in kda_cpu_info()). Builds at most once per process."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            verified, how = _build()
            if verified is None:
                _info.update(available=False, reason=how, path=None)
            else:
                with verified:
                    lib = ctypes.CDLL(verified.path)
                path = verified.real_path
                if lib.kda_cpu_abi() != _ABI:
                    raise OSError(f"{path}: ABI {lib.kda_cpu_abi()} != {_ABI}")
                f = lib.kda_cpu_scan
                f.restype = ctypes.c_int
                f.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_int] * 2
                _lib = lib
                _info.update(available=True, reason=how, path=path)
        except Exception as e:  # never let the fast path break the slow one
            _lib = None
            _info.update(available=False, reason=f"loading the kernel failed: {e!r}", path=None)
        _tried = True
    return _lib


def kda_cpu_info() -> dict:
    """{'available', 'enabled', 'reason', 'path', 'threads'}; builds the kernel if not tried yet."""
    _load()
    return {**_info, "enabled": enabled(), "threads": _threads()}


def available() -> bool:
    """True when the kernel is enabled and loads (building it on first call). Never raises."""
    return enabled() and _load() is not None


def _output(shape) -> tuple[mx.array | None, np.ndarray]:
    """A new fp32 MLX array and a writable NumPy view of its memory for the kernel to fill (MLX
    documents that such a view aliases the array); (None, a NumPy array to convert) should MLX ever
    hand out something that isn't a plain contiguous buffer."""
    a = mx.zeros(shape, dtype=mx.float32)
    mx.eval(a)
    h = np.asarray(a)
    if h.shape == shape and h.flags.writeable and h.flags.c_contiguous and h.dtype == np.float32:
        return a, h
    return None, np.empty(shape, dtype=np.float32)


def kda_cpu(q, k, v, g, beta, scale=None, initial_state=None):
    """Chunked KDA through the C kernel: (o [B,T,H,V] in v's dtype, state [B,H,K,V] fp32), or None
    when the kernel is off or unavailable. q, k [B,T,H,K] L2-normalised; g [B,T,H,K] log decay;
    beta [B,T,H]; initial_state [B,H,K,V] or None."""
    if not available():
        return None
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    f32 = mx.float32
    ins = [x if x.dtype == f32 else x.astype(f32) for x in (q, k, v, g, beta)]
    if initial_state is not None:
        ins.append(initial_state if initial_state.dtype == f32 else initial_state.astype(f32))
    mx.eval(*ins)
    # zero-copy views of the evaluated MLX buffers (a copy only where one is strided or broadcast)
    hq, hk, hv, hg, hb, *rest = (np.ascontiguousarray(np.asarray(x)) for x in ins)
    hs = rest[0] if rest else None
    (o_mx, o), (s_mx, s) = _output((B, T, H, V)), _output((B, H, K, V))
    if T == 0:
        s[...] = 0.0 if hs is None else hs
    else:
        ptrs = [a.ctypes.data for a in (hq, hk, hv, hg, hb)] + [None if hs is None else hs.ctypes.data,
                                                                o.ctypes.data, s.ctypes.data]
        rc = _lib.kda_cpu_scan(*ptrs, B, T, H, K, V, float(scale), _threads(), 0)
        if rc != 0:
            return None  # the kernel could not allocate its workspace: let the MLX path run
    o_mx = mx.array(o) if o_mx is None else o_mx
    s_mx = mx.array(s) if s_mx is None else s_mx
    return (o_mx if v.dtype == f32 else o_mx.astype(v.dtype)), s_mx
