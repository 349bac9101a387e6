"""Small native libraries built on first use: the user cache dir, the C compiler, atomic builds.

Shared by the BLAS shim (`_blas`) and the KDA CPU kernel (`ops/kda_cpu`). Standard library only:
`_blas` imports this before `mlx.core`. Nothing here raises on a missing or failing compiler;
callers get (None, why).

A cached library runs in our process, so it is loaded only through `cached_library`: it must sit
in a directory of this user that nobody else can write, be owned by this user and not writable by
others, and match the sha256 recorded for its cache key when it was built; anything else is
rebuilt (a shared or foreign cache dir: into a private temporary directory).
"""
from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile


def shadowed_package() -> str | None:
    """Why `kimi_mlx` is not this package, or None. Run from the folder that contains a clone
    named kimi_mlx, Python takes the clone's folder for the package (a namespace package, found
    before the installed one): its __init__ never runs (no `kimi_mlx.load`, no BLAS preload),
    while submodules still import. Entry points call this to say so instead of failing oddly."""
    import sys

    pkg = sys.modules.get("kimi_mlx")
    if pkg is None or getattr(pkg, "__file__", None):
        return None
    where = ", ".join(getattr(pkg, "__path__", [])) or "a folder"
    return (f"Python imported {where} as the kimi_mlx package (a folder without __init__.py), not the "
            "package inside it: the current directory contains a clone named kimi_mlx. Run from inside "
            "the clone or from another directory, or rename the clone (e.g. kimi-mlx).")


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
    from .settings import settings

    return settings().cache_dir or user_cache_dir()


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


def _why_unsafe(st: os.stat_result, what: str) -> str | None:
    """Why a file or directory that we are about to trust is not ours alone (None: it is)."""
    if st.st_uid != os.geteuid():
        return f"{what} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def private_dir(name: str, root: str | None = None) -> tuple[str, str | None]:
    """`<root>/<name>` (root: cache_root()) for native libraries: created 0700, and only used when it
    is a real directory of this user that nobody else can write. Otherwise a new private temporary
    directory (rebuilt each process), and why the cache was not used."""
    path = os.path.join(root or cache_root(), name)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
        why = None if stat.S_ISDIR(st.st_mode) else f"{path} is not a directory (a symlink?)"
        if why is None and st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.chmod(path, 0o700)  # ours, from an older version: tighten rather than rebuild forever
            st = os.lstat(path)
        why = why or _why_unsafe(st, path)
    except OSError as e:
        why = f"cannot use {path}: {e.strerror or e}"
    if why is None:
        return path, None
    tmp = tempfile.mkdtemp(prefix=f"kimi_mlx-{name}-")
    atexit.register(shutil.rmtree, tmp, True)
    return tmp, f"{why}; built in a private temporary directory"


class Library:
    """A verified native library, held open: `path` names exactly the verified bytes until close()
    (on Linux /proc/self/fd/N, so no rename after the check can swap them). Pass `fd` to a
    subprocess with pass_fds to let it load the same bytes."""

    def __init__(self, fd: int, real_path: str):
        self.fd, self.real_path = fd, real_path
        proc = f"/proc/self/fd/{fd}"
        self.path = proc if os.path.exists(proc) else real_path

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_trusted(path: str) -> tuple[int, str | None]:
    """An fd for `path` (not following a final symlink) and why it can't be trusted (None: ours alone)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    why = None if stat.S_ISREG(st.st_mode) else f"{path} is not a regular file"
    return fd, why or _why_unsafe(st, path)


def _sha256_fd(fd: int) -> str:
    h, off = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, off):
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def _record_path(lib_path: str) -> str:
    return lib_path + ".sha256"


def open_verified(path: str, key: str) -> tuple[Library | None, str]:
    """The cached library at `path`, if it and its directory are this user's alone and its bytes
    match the sha256 recorded for `key` when it was built; else (None, why not)."""
    fd = -1
    try:
        why = _why_unsafe(os.lstat(os.path.dirname(path) or "."), os.path.dirname(path) or ".")
        if why:
            return None, why
        try:
            fd, why = _open_trusted(path)
        except FileNotFoundError:
            return None, "not built yet"
        if why:
            return None, why
        try:
            rfd, why = _open_trusted(_record_path(path))
        except FileNotFoundError:
            return None, f"{path} has no build record"
        try:
            record = os.read(rfd, 4096).decode("ascii", "replace").split()
        finally:
            os.close(rfd)
        if why:
            return None, why
        if record[:1] != [key]:
            return None, f"{_record_path(path)} was recorded for another build"
        if record[1:2] != [_sha256_fd(fd)]:
            return None, f"{path} does not match the sha256 recorded when it was built"
        lib, fd = Library(fd, path), -1
        return lib, "cached"
    except OSError as e:
        return None, f"cannot check {path}: {e.strerror or e}"
    finally:
        if fd >= 0:
            os.close(fd)


def cached_library(path: str, key: str, build) -> tuple[Library | None, str]:
    """The library cached at `path` for `key` (see open_verified), else a new one: `build(tmp)`
    writes it to a temporary name in the same directory and returns None or why it failed. The
    result is hashed while held open, its record written, then both renamed into place, so a
    concurrent first use never loads a half-written or foreign file."""
    lib, why = open_verified(path, key)
    if lib is not None:
        return lib, "cached"
    d = os.path.dirname(path) or "."
    tmp = rec_tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".build-", suffix=".so")
        os.close(fd)
        err = build(tmp)
        if err:
            return None, err
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may allow group writes
        fd, bad = _open_trusted(tmp)
        lib = Library(fd, path)
        if bad:
            lib.close()
            return None, bad
        rfd, rec_tmp = tempfile.mkstemp(dir=d, prefix=".build-", suffix=".sha256")
        with os.fdopen(rfd, "w") as f:
            f.write(f"{key} {_sha256_fd(lib.fd)}\n")
        os.replace(tmp, path)
        os.replace(rec_tmp, _record_path(path))
        tmp = rec_tmp = None
        return lib, "compiled" if why == "not built yet" else f"compiled (the cached copy was refused: {why})"
    except OSError as e:
        if lib is not None:
            lib.close()
        return None, f"building {os.path.basename(path)} failed: {e.strerror or e}"
    finally:
        for t in (tmp, rec_tmp):
            if t:
                try:
                    os.unlink(t)
                except OSError:
                    pass


def compile_shared(cc: str, c_file: str, out: str, flags: list[str], timeout: float = 120) -> str | None:
    """Compile `c_file` into the shared library `out`; None, or why it failed."""
    try:
        r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", out, c_file], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    except Exception as e:
        return f"compiling {os.path.basename(c_file)} failed: {e!r}"
    if r.returncode != 0:
        return f"{os.path.basename(cc)} {' '.join(flags)} failed: {r.stderr.decode(errors='replace')[-300:]}"
    return None
