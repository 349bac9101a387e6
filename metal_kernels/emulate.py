"""Run the kernels on the CPU: the Metal text (g++ + metal_stub.h), the CUDA text (g++ +
cuda_stub.h), and a float64 numpy reference.

Used by the CPU tests: it proves the shared algorithm (and the text of both renderings) without
a Mac or an NVIDIA GPU. Needs a C++20 compiler (g++ >= 11 or clang++ with libstdc++ <barrier>);
the CUDA emulator also needs UBSan's runtime (libubsan, which g++ ships).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .dialect import CUDA, METAL
from .sources import cuda_emu_unit, cuda_unit, io_names, metal_unit

HERE = Path(__file__).resolve().parent
_BF16 = "bfloat16"


def cxx() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def compile_unit(src: str, out: Path, syntax_only: bool = False, opt="-O1") -> None:
    cc = cxx()
    if cc is None:
        raise RuntimeError("no C++ compiler")
    src_path = out.with_suffix(".cpp")
    src_path.write_text(src)
    cmd = [cc, "-std=c++20", "-Wno-unknown-pragmas", "-Wno-attributes", f"-I{HERE}"]
    opts = [opt] if isinstance(opt, str) else list(opt)
    cmd += ["-fsyntax-only", str(src_path)] if syntax_only else [*opts, "-pthread", str(src_path), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr[-6000:]}")


def _cache_dir() -> Path:
    """Per-user directory of compiled emulators (0700, ours): a shared fixed path would let
    another user plant an executable that the tests then run."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    d = Path(os.environ.get("KDA_EMU_CACHE", Path(tempfile.gettempdir()) / f"kda_metal_emu-{uid}"))
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if hasattr(os, "getuid") and (st.st_uid != uid or st.st_mode & 0o022 or d.is_symlink()):
        raise RuntimeError(f"{d}: emulator cache is not a private directory of this user; remove it "
                           "or set KDA_EMU_CACHE")
    return d


def _build(src: str, exe: Path, opt=("-O1",)) -> None:
    """Compile to a private temp name, then rename: two test runs never see a half-written file."""
    tmp = exe.with_name(f".{exe.name}.{os.getpid()}.tmp")
    try:
        compile_unit(src, tmp, opt=opt)
        os.replace(tmp, exe)
    finally:
        for leftover in (tmp, tmp.with_suffix(".cpp")):
            leftover.unlink(missing_ok=True)


def _to_bytes(a: np.ndarray, dtype: str) -> bytes:
    if dtype in ("int32", "uint32"):
        return np.ascontiguousarray(a, dtype=np.dtype(dtype)).tobytes()
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == _BF16:  # round to nearest even, as bfloat16_t in the stub
        u = a.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.astype(np.uint16).tobytes()
    if dtype == "float16":
        return a.astype(np.float16).tobytes()
    return a.tobytes()


def _from_bytes(b: bytes, dtype: str, shape) -> np.ndarray:
    if dtype in ("int32", "uint32"):
        return np.frombuffer(b, dtype=np.dtype(dtype)).reshape(shape).copy()
    if dtype == _BF16:
        u = np.frombuffer(b, dtype=np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if dtype == "float16":
        return np.frombuffer(b, dtype=np.float16).astype(np.float32).reshape(shape)
    return np.frombuffer(b, dtype=np.float32).reshape(shape).copy()


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """Values as the kernel sees them after the cast to `dtype`."""
    return _from_bytes(_to_bytes(a, dtype), dtype, np.shape(a))


def _write(path: Path, a: np.ndarray, dtype: str) -> None:
    shape = np.asarray(np.shape(a), dtype=np.int32)
    with open(path, "wb") as fp:
        fp.write(np.int32(len(shape)).tobytes())
        fp.write(shape.tobytes())
        fp.write(_to_bytes(a, dtype))


def _read(path: Path, dtype: str) -> np.ndarray:
    raw = path.read_bytes()
    nd = int(np.frombuffer(raw[:4], np.int32)[0])
    shape = tuple(np.frombuffer(raw[4:4 + 4 * nd], np.int32))
    return _from_bytes(raw[4 + 4 * nd:], dtype, shape)


def run_metal(kind, template, inputs, in_dtypes, outputs, out_dtypes, grid, nt):
    """Emulate one dispatch. inputs: name -> array; outputs: name -> shape (filled with NaN
    first, so unwritten elements show). grid is in threadgroups. Returns name -> array."""
    src = metal_unit(kind, template, in_dtypes, out_dtypes, with_main=True)
    return _run(src, "metal_stub.h", kind, io_names(kind, METAL), inputs, in_dtypes, outputs,
                out_dtypes, [*grid, nt])


def run_cuda(kind, template, inputs, in_dtypes, outputs, out_dtypes, grid, nt, smem_bytes):
    """run_metal for the CUDA text (cuda_stub.h): grid in blocks, smem_bytes of dynamic shared
    memory a block (what MLX's cuda_kernel is given as shared_memory)."""
    src = cuda_unit(kind, template, in_dtypes, out_dtypes, with_main=True)
    return _run(src, "cuda_stub.h", kind, io_names(kind, CUDA), inputs, in_dtypes, outputs,
                out_dtypes, [*grid, nt, smem_bytes], opt=_CUDA_OPT)


def run_cuda_body(label, header, body, template, inputs, in_dtypes, outputs, out_dtypes, grid, nt,
                  smem_bytes):
    """run_cuda for any kernel text (header, body): the inputs and outputs in dict order."""
    src = cuda_emu_unit(header, body, list(inputs), list(outputs), template, in_dtypes, out_dtypes)
    return _run(src, "cuda_stub.h", label, (list(inputs), list(outputs)), inputs, in_dtypes, outputs,
                out_dtypes, [*grid, nt, smem_bytes], opt=_CUDA_OPT)


# strict aliasing off: the CUDA text reinterprets registers and tiles as CUDA allows; misaligned
# vector accesses (uint4, float2), which the GPU faults on and x86 forgives, stop the emulator
_CUDA_OPT = ("-O1", "-fno-strict-aliasing", "-fsanitize=alignment", "-fno-sanitize-recover=alignment")


def _run(src, stub, kind, names, inputs, in_dtypes, outputs, out_dtypes, args, opt=("-O1",)):
    key = hashlib.sha256((src + (HERE / stub).read_text() + " ".join(opt)).encode()).hexdigest()[:16]
    exe = _cache_dir() / f"{stub.split('_')[0]}_{kind}_{key}"
    if not exe.exists():
        _build(src, exe, opt)
    in_names, out_names = names
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for n in in_names:
            _write(d / f"{n}.bin", inputs[n], in_dtypes[n])
        for n in out_names:
            _write(d / f"{n}.bin", np.full(outputs[n], np.nan, np.float32), out_dtypes[n])
        r = subprocess.run([str(exe), str(d), *map(str, args)], capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"emulated kernel failed ({r.returncode}): {r.stderr[-3000:]}")
        return {n: _read(d / f"{n}.bin", out_dtypes[n]) for n in out_names}


# ---------------------------------------------------------------------------------------------
# float64 reference of what the kernels compute, from the raw projections.

def short_conv_np(x, conv_state, w, dtype: str):
    """A decode token's causal short conv as the fused decode kernel runs it: x [B, C], conv_state
    [B, KC-1, C], w [C, KC] (values as the kernel sees them) -> (silu(conv) rounded to dtype,
    the shifted state [B, KC-1, C])."""
    xs = np.concatenate([conv_state, x[:, None]], axis=1).astype(np.float64)  # [B, KC, C]
    acc = (xs * np.asarray(w, np.float64).T[None]).sum(axis=1)
    return round_to(acc / (1.0 + np.exp(-acc)), dtype), xs[:, 1:]


def conv_decode_case(rng, B: int, H: int, K: int, V: int, dtype: str, kc: int = 4):
    """A decode step whose kernel runs the short convs (KC): its inputs (x [B, C], conv_state
    [B, kc-1, C], w [C, kc], values of dtype) and what they give: q_raw, k_raw [B, H, K], v
    [B, H, V] and the shifted conv state."""
    C = H * (2 * K + V)
    args = tuple(round_to(a, dtype) for a in (rng.standard_normal((B, C)), rng.standard_normal((B, kc - 1, C)),
                                              0.5 * rng.standard_normal((C, kc))))
    y, state = short_conv_np(*args, dtype)
    raw = dict(q_raw=y[:, :H * K].reshape(B, H, K), k_raw=y[:, H * K:2 * H * K].reshape(B, H, K),
               v=y[:, 2 * H * K:].reshape(B, H, V))
    return args, raw, state


def low_rank_decode_case(rng, B: int, H: int, K: int, V: int, dtype: str):
    """A decode step whose kernel runs the second low-rank projections (LR): its inputs (f_a, g_a
    [B, K], f_w [H*K, K], g_w [H*V, K], values of dtype) and what they give: f [B, H, K] and gate
    [B, H, V], rounded to dtype as the matmuls' outputs are."""
    f_a, g_a = (round_to(rng.standard_normal((B, K)), dtype) for _ in range(2))
    f_w, g_w = (round_to(0.2 * rng.standard_normal((H * n, K)), dtype) for n in (K, V))
    raw = dict(f=round_to(f_a @ f_w.T, dtype).reshape(B, H, K), gate=round_to(g_a @ g_w.T, dtype).reshape(B, H, V))
    return (f_a, g_a, f_w, g_w), raw


def gates_np(q_raw, k_raw, f, dt_bias, A_log, b_raw):
    """(q scaled, k, g, beta) in float64: L2 norm, q * K^-1/2, g = -exp(A_log) softplus(f + dt_bias)."""
    q = np.asarray(q_raw, np.float64)
    k = np.asarray(k_raw, np.float64)
    K = q.shape[-1]
    H = q.shape[-2]
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) * K ** -0.5
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    x = np.asarray(f, np.float64) + np.asarray(dt_bias, np.float64).reshape(H, K)
    sp = np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))
    g = -np.exp(np.asarray(A_log, np.float64).reshape(H, 1)) * sp
    beta = 1.0 / (1.0 + np.exp(-np.asarray(b_raw, np.float64)))
    return q, k, g, beta


def kda_np(q, k, v, g, beta, S0=None):
    """Token recurrence. q (scaled), k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K]; beta [B,T,H]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = np.zeros((B, H, K, V)) if S0 is None else np.array(S0, np.float64)
    o = np.zeros((B, T, H, V))
    v = np.asarray(v, np.float64)
    for t in range(T):
        S = S * np.exp(g[:, t])[..., None]
        kt = k[:, t]
        u = beta[:, t][..., None] * (v[:, t] - np.einsum("bhk,bhkv->bhv", kt, S))
        S = S + kt[..., None] * u[..., None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
