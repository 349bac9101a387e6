"""Small native libraries built on first use: the user cache dir, the C compiler, atomic builds.

Shared by the BLAS shim (`_blas`) and the KDA CPU kernel (`ops/kda_cpu`). Standard library only:
`_blas` imports this before `mlx.core`. Nothing here raises on a missing or failing compiler;
callers get (None, why).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess


def user_cache_dir() -> str:
    """kimi_mlx's directory in the user cache (BLAS probes and shim, compiled kernels, remembered speeds)."""
    try:
        from platformdirs import user_cache_dir as _platform_cache_dir

        return _platform_cache_dir("kimi_mlx", appauthor=False)
    except Exception:
        return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kimi_mlx")


def cache_root() -> str:
    """Where kimi_mlx keeps what it computes once (compiled kernels, remembered prefill speeds):
    KIMI_MLX_CACHE if set, else user_cache_dir()."""
    return os.environ.get("KIMI_MLX_CACHE") or user_cache_dir()


def compiler() -> str | None:
    """The C compiler to use: $CC, cc, gcc or clang (first found), or None."""
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def cpu_signature() -> str:
    """What a -march=native build depends on: machine, CPU model and feature flags."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("vendor_id", "model name", "cpu family", "model", "flags", "Features",
                           "CPU implementer", "CPU part"):
                    parts.append(line.strip())
                elif not line.strip() and len(parts) > 1:
                    break  # the first processor is enough
    except OSError:
        parts.append(platform.processor())  # macOS: no /proc
    return "|".join(parts)


def file_id(path: str) -> str:
    """Identity of a file on disk (resolved path, size, mtime) for cache keys; the path alone if missing."""
    try:
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return path


def digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def compile_shared(cc: str, c_file: str, out: str, flags: list[str], timeout: float = 120) -> tuple[str | None, str]:
    """Compile `c_file` into the shared library `out` (written atomically: concurrent first uses
    never load a half-written file). Returns (out, "compiled") or (None, why not)."""
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, c_file], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            return None, f"{os.path.basename(cc)} {' '.join(flags)} failed: {r.stderr.decode(errors='replace')[-300:]}"
        os.replace(tmp, out)
        return out, "compiled"
    except Exception as e:
        return None, f"compiling {os.path.basename(c_file)} failed: {e!r}"
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
