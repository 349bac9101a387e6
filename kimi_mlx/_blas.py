"""Load an optimized BLAS before mlx.core on Linux.

The mlx-cpu wheel links the reference BLAS/LAPACK (about 2.4 GFLOP/s for an fp32 matmul on a
2-core box). libmlx.so binds `cblas_sgemm` & co. by name, and a library loaded RTLD_GLOBAL before
libmlx.so comes first in the symbol search, so preloading an optimized one is enough (≈20× faster).

Order (first that works wins):
  1. KIMI_MLX_BLAS: `off` (keep the reference BLAS), `auto` (default), `system`, `scipy`, or a path;
     a path or library name that fails is reported and the automatic order continues.
  2. the system OpenBLAS (libopenblas.so.0: Debian/Ubuntu `libopenblas0-pthread`, Fedora `openblas`).
  3. the `scipy-openblas32` wheel. Its symbols are prefixed (`scipy_cblas_sgemm`), so a tiny
     forwarding library exporting the unprefixed names is generated and compiled with the system C
     compiler into the user cache dir on first use (skipped when there is no compiler), and
     loaded only once `_native.cached_library` has verified it.

Safety: a foreign BLAS can kill the process with SIGILL on its first call (a wheel built for newer
CPUs). Each candidate is therefore first exercised in a short subprocess; the verdict is cached
per library file. Nothing here raises: every failure leaves the reference BLAS in place, and
`blas_info()` says what happened.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys

from ._native import Library, cached_library, compile_shared, compiler, file_id, private_dir, user_cache_dir

# what was loaded: the library path(s), or None when MLX keeps its reference BLAS
LOADED: str | None = None
_INFO: dict = {"loaded": False, "source": "reference", "path": None, "reason": "preload() not run"}
_LIBS: list = []  # keep the CDLL handles alive

_SYSTEM_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
    "libopenblas.so.0",  # bare soname: the dynamic loader's own search (ld.so.cache, LD_LIBRARY_PATH)
)

# The shim forwards by exact C signature. cblas_* take floats by value, so they need their real
# prototypes; the LAPACK routines take only pointers plus hidden Fortran string lengths (size_t),
# so (pointer count, length count) fully determines their calling convention.
_CBLAS = {
    "cblas_sgemm": ("void", "int o, int ta, int tb, int m, int n, int k, float al, const float *a, int lda, "
                            "const float *b, int ldb, float be, float *c, int ldc",
                    "o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc"),
    "cblas_dgemm": ("void", "int o, int ta, int tb, int m, int n, int k, double al, const double *a, int lda, "
                            "const double *b, int ldb, double be, double *c, int ldc",
                    "o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc"),
    "cblas_cgemm": ("void", "int o, int ta, int tb, int m, int n, int k, const void *al, const void *a, int lda, "
                            "const void *b, int ldb, const void *be, void *c, int ldc",
                    "o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc"),
}
_LAPACK = {  # name: (pointer args, hidden string-length args)
    "getrf_": (6, 0), "getri_": (7, 0), "geqrf_": (8, 0), "orgqr_": (9, 0), "potrf_": (5, 1),
    "trtri_": (6, 2), "syevd_": (11, 2), "gesdd_": (14, 1), "geev_": (14, 2),
}
_LAPACK_C = {"cheevd_": (13, 2), "cgesdd_": (15, 1), "cgeev_": (14, 2)}
_SHIM_VERSION = "1"

# Run in a fresh interpreter: load the libraries and multiply 192x192 matrices through the
# given sgemm symbol of the last one (large enough to reach the optimized kernels that a bad build dies in).
_PROBE = r"""
import ctypes, sys
libs = [ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL) for p in sys.argv[2:]]
f = getattr(libs[-1], sys.argv[1])
n = 192
F = ctypes.c_float * (n * n)
a = F(*([0.5] * (n * n))); b = F(*([2.0] * (n * n))); c = F()
f.restype = None
f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, F, ctypes.c_int, F, ctypes.c_int, ctypes.c_float, F, ctypes.c_int]
f(101, 111, 111, n, n, n, 1.0, a, n, b, n, 0.0, c, n)
sys.exit(0 if abs(c[0] - n) < 1e-3 and abs(c[n * n - 1] - n) < 1e-3 else 3)
"""


def blas_info() -> dict:
    """What preload() did: loaded, source (env/system/scipy-openblas32/reference), path, reason, and
    the library's own config string and thread count when it exports them."""
    info = dict(_INFO)
    for lib in _LIBS:
        for prefix in ("", "scipy_"):
            cfg = getattr(lib, f"{prefix}openblas_get_config", None)
            if cfg is not None:
                try:
                    cfg.restype = ctypes.c_char_p
                    info["config"] = cfg().decode(errors="replace").strip()
                    nt = getattr(lib, f"{prefix}openblas_get_num_threads")
                    nt.restype = ctypes.c_int
                    info["threads"] = int(nt())
                except Exception:  # informational only
                    pass
    return info


_CACHE_DIR: list = []  # (dir, why the user cache was not used), found once per process


def _cache_dir() -> str:
    """The private directory for probe verdicts and the shim (see _native.private_dir)."""
    if not _CACHE_DIR:
        _CACHE_DIR.extend(private_dir("blas", root=user_cache_dir()))
    return _CACHE_DIR[0]


def _file_key(paths: list[str]) -> str:
    h = hashlib.sha256(f"{_SHIM_VERSION}|{sys.executable}|{os.uname().machine}".encode())
    for p in paths:
        h.update(f"|{file_id(p)}".encode())  # a bare soname: the name itself
    return h.hexdigest()[:16]


def _probe(paths: list[str], symbol: str = "cblas_sgemm", shim: Library | None = None) -> bool:
    """True when the libraries load and survive a real sgemm in a subprocess; verdicts are cached on disk.
    `shim`: the verified library that paths[-1] names, loaded by the subprocess from its held-open fd."""
    d = _cache_dir()
    mark = os.path.join(d, f"probe-{_file_key(paths + [symbol])}")
    for verdict in ("ok", "bad"):
        if os.path.exists(f"{mark}.{verdict}"):
            return verdict == "ok"
    try:
        load = paths if shim is None else [*paths[:-1], shim.path]
        r = subprocess.run([sys.executable, "-S", "-c", _PROBE, symbol, *load], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
                           pass_fds=() if shim is None else (shim.fd,))
        ok = r.returncode == 0
    except Exception:
        return False  # can't tell (no fork, timeout): don't risk it, and don't cache
    try:
        os.makedirs(d, exist_ok=True)
        with open(f"{mark}.{'ok' if ok else 'bad'}", "w") as f:
            f.write(" ".join(paths) + "\n")
    except OSError:
        pass
    return ok


def _load(paths: list[str]) -> list:
    return [ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL) for p in paths]


def _try(paths: list[str], shim: Library | None = None) -> str | None:
    """Probe out of process first (a bad build must not touch this one), then load globally;
    returns why not, or None on success. `shim`: see _probe."""
    if not _probe(paths, shim=shim):
        return f"{' + '.join(paths)} failed the subprocess sgemm probe (no cblas_sgemm, or it crashed)"
    try:
        _LIBS.extend(_load(paths if shim is None else [*paths[:-1], shim.path]))
    except OSError as e:
        return f"cannot load {paths[-1]}: {e}"
    return None


def _scipy_openblas() -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec("scipy_openblas32")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    libdir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    try:
        names = sorted(n for n in os.listdir(libdir) if n.startswith("libscipy_openblas") and ".so" in n)
    except OSError:
        return None
    return os.path.join(libdir, names[0]) if names else None


def shim_source(lib: ctypes.CDLL, prefix: str = "scipy_") -> tuple[str, list[str]]:
    """C source forwarding the unprefixed names libmlx.so needs to `prefix`ed ones that `lib` exports."""
    lines = ["/* generated by kimi_mlx._blas: unprefixed BLAS/LAPACK names -> " + prefix + "* */",
             "#include <stddef.h>"]
    names = []
    for name, (ret, params, args) in _CBLAS.items():
        if hasattr(lib, prefix + name):
            lines.append(f"extern {ret} {prefix}{name}({params});")
            lines.append(f"{ret} {name}({params}) {{ {prefix}{name}({args}); }}")
            names.append(name)
    lapack = {t + n: sig for n, sig in _LAPACK.items() for t in "sd"}
    lapack.update(_LAPACK_C)
    for name, (nptr, nlen) in sorted(lapack.items()):
        if not hasattr(lib, prefix + name):
            continue
        params = ", ".join([f"void *p{i}" for i in range(nptr)] + [f"size_t l{i}" for i in range(nlen)])
        args = ", ".join([f"p{i}" for i in range(nptr)] + [f"l{i}" for i in range(nlen)])
        lines.append(f"extern void {prefix}{name}({params});")
        lines.append(f"void {name}({params}) {{ {prefix}{name}({args}); }}")
        names.append(name)
    return "\n".join(lines) + "\n", names


def build_shim(scipy_lib: str) -> tuple[Library | None, str]:
    """The verified forwarding library for `scipy_lib` (cached, else compiled), held open, or (None, why not)."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler for the scipy-openblas32 shim"
    key = _file_key([scipy_lib])

    def build(tmp: str) -> str | None:
        src, names = shim_source(ctypes.CDLL(scipy_lib, mode=ctypes.RTLD_LOCAL))
        if "cblas_sgemm" not in names:
            return f"{scipy_lib} exports no scipy_cblas_sgemm"
        c_file = tmp[:-3] + ".c"
        try:
            with open(c_file, "w") as f:
                f.write(src)
            return compile_shared(cc, c_file, tmp, ["-O2"])
        finally:
            if os.path.exists(c_file):
                os.unlink(c_file)

    try:
        lib, how = cached_library(os.path.join(_cache_dir(), f"libkimi_blas_shim-{key}.so"), key, build)
    except Exception as e:
        return None, f"shim build failed: {e}"
    note = _CACHE_DIR[1]
    return lib, f"{how}; {note}" if note and lib is not None else how


def _set(source: str, paths: list[str], reason: str, **extra) -> str:
    global LOADED
    LOADED = os.pathsep.join(paths)
    _INFO.clear()
    _INFO.update({"loaded": True, "source": source, "path": LOADED, "reason": reason, **extra})
    return LOADED


def _preload() -> str | None:
    global LOADED
    if not sys.platform.startswith("linux"):
        _INFO.update(reason="not Linux: MLX uses the platform's BLAS")
        return None
    from .settings import settings

    choice = settings().blas
    if choice == "off":
        _INFO.update(reason="disabled by KIMI_MLX_BLAS")
        return None
    if "mlx.core" in sys.modules:
        _INFO.update(reason="mlx.core was imported before kimi_mlx: too late to swap the BLAS")
        return None
    notes = []
    mode = choice.lower()
    if mode not in ("", "auto", "system", "scipy"):
        # a bare name (libopenblas.so.0) goes to the dynamic loader's own search
        exists = os.path.exists(choice) or os.sep not in choice
        why = _try([choice]) if exists else f"KIMI_MLX_BLAS={choice}: no such file"
        if why is None:
            return _set("env", [choice], "KIMI_MLX_BLAS")
        notes.append(why)
        import warnings

        warnings.warn(f"kimi_mlx: {why}; trying the automatic choice", RuntimeWarning, stacklevel=3)
    if mode != "scipy":
        for path in _SYSTEM_CANDIDATES:
            if os.sep in path and not os.path.exists(path):
                continue
            why = _try([path])
            if why is None:
                return _set("system", [path], "system OpenBLAS", notes=notes)
            notes.append(why)
    if mode != "system":
        lib = _scipy_openblas()
        if lib is None:
            notes.append("scipy-openblas32 not installed")
        else:
            shim, how = (None, f"{lib} failed the sgemm probe")
            if _probe([lib], "scipy_cblas_sgemm"):
                shim, how = build_shim(lib)
            if shim is None:
                notes.append(how)
            else:
                with shim:
                    why = _try([lib, shim.real_path], shim)
                if why is None:
                    return _set("scipy-openblas32", [lib, shim.real_path],
                                f"scipy-openblas32 through the shim ({how})", notes=notes)
                notes.append(why)
    _INFO.update(reason="; ".join(notes) or "nothing found", notes=notes)
    return None


def preload() -> str | None:
    """Load the best safe BLAS globally (once); returns what was loaded, or None. Never raises."""
    if LOADED is not None or _INFO.get("reason") != "preload() not run":
        return LOADED
    try:
        return _preload()
    except Exception as e:  # never break `import kimi_mlx`
        _INFO.update(loaded=False, source="reference", reason=f"preload error: {e!r}")
        return None
