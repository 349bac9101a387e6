"""Our C kernel for KDA on the CPU (kimi_mlx/ops/kda_cpu.c, selected by `pytest -k kernel`):
against the per-token recurrence and the MLX-ops chunked form on odd shapes, its build and
fallbacks, and the dispatch that puts it in the model's path. test_kda_ops.py runs it too
(`cpu_kernel`: FLA's golden outputs, bf16 inputs, extreme gates)."""
from __future__ import annotations

import hashlib
import importlib
import os
import threading

import mlx.core as mx
import numpy as np
import pytest

from helpers import MODELS, golden, make_inputs, max_abs
from kimi_mlx import _native, load_model
from kimi_mlx.ops import kda_cpu as kc
from kimi_mlx.ops.kda_chunked import kda_chunked
from kimi_mlx.ops.kda_reference import kda_recurrent

TOL = 1e-5
kda_mod = importlib.import_module("kimi_mlx.ops.kda")


@pytest.fixture(autouse=True)
def _kernel_on(monkeypatch):
    for var in ("KIMI_MLX_KDA", "KIMI_MLX_KDA_CPU", "KIMI_MLX_KDA_THREADS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def kernel():
    """The kernel must build wherever there is a C compiler (CI has gcc)."""
    if _native.compiler() is None:
        pytest.skip("no C compiler")
    info = kc.kda_cpu_info()
    assert info["available"], info["reason"]
    return kc.kda_cpu


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """Forget the loaded library for one test (restored afterwards); builds go to tmp_path."""
    monkeypatch.setattr(kc, "_lib", None)
    monkeypatch.setattr(kc, "_tried", False)
    monkeypatch.setattr(kc, "_info", dict(kc._info))
    monkeypatch.setenv("KIMI_MLX_CACHE", str(tmp_path))


def _check(o, s, o_ref, s_ref, tol=TOL):
    assert o.shape == o_ref.shape and s.shape == s_ref.shape and s.dtype == mx.float32
    scale = max(1.0, float(mx.abs(o_ref).max()))
    assert max_abs(o, o_ref) < tol * scale
    assert max_abs(s, s_ref) < tol * max(1.0, float(mx.abs(s_ref).max()))


CONFIGS = [  # B, H, K, V, initial state
    (1, 2, 16, 24, False),
    (2, 3, 32, 48, True),
]


@pytest.mark.parametrize("T", [1, 7, 17, 64, 65, 130, 300])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["b1h2k16v24", "b2h3k32v48_state"])
def test_kernel_matches_recurrent_and_chunked(kernel, T, cfg):
    B, H, K, V, state = cfg
    args, s0 = make_inputs(B, T, H, K, V, seed=100 + T, state=state)
    o, s = kernel(*args, initial_state=s0)
    assert o.dtype == mx.float32
    _check(o, s, *kda_recurrent(*args, initial_state=s0))
    if T > 1:
        _check(o, s, *kda_chunked(*args, initial_state=s0))


@pytest.mark.parametrize("K,V", [(7, 5), (20, 40), (128, 128)])
def test_kernel_unpadded_dims(kernel, K, V):
    """K not a multiple of 8, V not a multiple of 16 (the kernel pads internally), and the real size."""
    args, s0 = make_inputs(1, 70, 2, K, V, seed=K, state=True)
    _check(*kernel(*args, initial_state=s0), *kda_recurrent(*args, initial_state=s0))
    one = [a[:, :1] for a in args]
    _check(*kernel(*one, initial_state=s0), *kda_recurrent(*one, initial_state=s0))


def test_kernel_strong_decay(kernel):
    """g around -5 per step: cumulative decays reach e^-320 in a chunk (an exp(+G) form overflows)."""
    args, s0 = make_inputs(2, 150, 2, 32, 24, seed=5, g_range=(-6.0, -4.0), state=True)
    o, s = kernel(*args, initial_state=s0)
    assert bool(mx.isfinite(o).all()) and bool(mx.isfinite(s).all())
    _check(o, s, *kda_recurrent(*args, initial_state=s0))


def test_kernel_scale_state_carry_and_empty(kernel):
    args, s0 = make_inputs(2, 150, 2, 16, 24, seed=12, state=True)
    _check(*kernel(*args, scale=0.3, initial_state=s0), *kda_recurrent(*args, scale=0.3, initial_state=s0))
    o_all, s_all = kda_recurrent(*args, initial_state=s0)
    o1, s1 = kernel(*[a[:, :77] for a in args], initial_state=s0)
    o2, s2 = kernel(*[a[:, 77:] for a in args], initial_state=s1)
    _check(mx.concatenate([o1, o2], axis=1), s2, o_all, s_all)
    o0, s0_out = kernel(*[a[:, :0] for a in args], initial_state=s0)
    assert o0.shape == (2, 0, 2, 24) and max_abs(s0_out, s0) == 0.0
    o0, z = kernel(*[a[:, :0] for a in args])
    assert float(mx.abs(z).max()) == 0.0


def test_kernel_strided_inputs(kernel):
    """Transposed / sliced MLX arrays are made contiguous before the kernel reads them."""
    args, s0 = make_inputs(1, 40, 4, 16, 16, seed=13, state=True)
    q, k, v, g, beta = args
    qt = mx.contiguous(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # same values, strided
    st = mx.contiguous(s0.swapaxes(-1, -2)).swapaxes(-1, -2)
    _check(*kernel(qt, k, v[..., :16], g, beta, initial_state=st), *kda_recurrent(*args, initial_state=s0))


def test_kernel_threads_deterministic(kernel, monkeypatch):
    """Each (batch, head) runs on one thread start to end: any thread count gives identical bits."""
    args, s0 = make_inputs(2, 100, 3, 16, 24, seed=14, state=True)
    o2, s2 = kernel(*args, initial_state=s0)
    monkeypatch.setenv("KIMI_MLX_KDA_THREADS", "1")
    o1, s1 = kernel(*args, initial_state=s0)
    assert bool(mx.array_equal(o1, o2)) and bool(mx.array_equal(s1, s2))


# ---------------------------------------------------------------------------------------------
# dispatch, switches and fallbacks
def _spy(monkeypatch, name):
    calls = []
    real = getattr(kda_mod, name)
    monkeypatch.setattr(kda_mod, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))
    return calls


def test_kernel_dispatch_on_cpu(kernel, monkeypatch):
    """Every prompt of two tokens or more goes to the kernel; one token stays on the lazy kda_step."""
    args, s0 = make_inputs(1, 20, 2, 16, 24, seed=15, state=True)
    calls = _spy(monkeypatch, "kda_cpu")
    for T in (1, 2, 20):
        part = [a[:, :T] for a in args]
        _check(*kda_mod.kda(*part, initial_state=s0), *kda_recurrent(*part, initial_state=s0))
    assert calls == ["kda_cpu"] * 2


def test_kernel_env_off_runs_mlx_ops(kernel, monkeypatch):
    args, s0 = make_inputs(1, 20, 2, 16, 24, seed=16, state=True)
    o_k, s_k = kda_mod.kda(*args, initial_state=s0)
    chunked = _spy(monkeypatch, "kda_chunked")
    monkeypatch.setenv("KIMI_MLX_KDA_CPU", "off")
    assert kc.kda_cpu(*args, initial_state=s0) is None and not kc.kda_cpu_info()["enabled"]
    o, s = kda_mod.kda(*args, initial_state=s0)
    assert chunked == ["kda_chunked"]
    _check(o, s, o_k, s_k)
    monkeypatch.setenv("KIMI_MLX_KDA_CPU", "on")
    monkeypatch.setenv("KIMI_MLX_KDA", "reference")  # the reference switch wins over the kernel too
    assert kc.kda_cpu(*args, initial_state=s0) is None


def test_kernel_no_compiler_falls_back(fresh_load, monkeypatch):
    monkeypatch.setattr(_native, "compiler", lambda: None)
    args, s0 = make_inputs(1, 20, 2, 16, 24, seed=17, state=True)
    assert kc.kda_cpu(*args, initial_state=s0) is None
    info = kc.kda_cpu_info()
    assert not info["available"] and "compiler" in info["reason"]
    chunked = _spy(monkeypatch, "kda_chunked")
    _check(*kda_mod.kda(*args, initial_state=s0), *kda_recurrent(*args, initial_state=s0))
    assert chunked == ["kda_chunked"]


def test_kernel_build_failure_and_arch(fresh_load, monkeypatch):
    monkeypatch.setattr(_native, "compile_shared", lambda *a, **kw: "boom")
    assert not kc.available()
    assert "boom" in kc.kda_cpu_info()["reason"]
    monkeypatch.setattr(kc, "_tried", False)
    monkeypatch.setattr(kc.platform, "machine", lambda: "sparc64")
    assert not kc.available() and "architecture" in kc.kda_cpu_info()["reason"]


def test_kernel_build_cached(kernel, fresh_load):
    """First use compiles into KIMI_MLX_CACHE/kernels; the next process finds it there."""
    assert kc.available() and kc.kda_cpu_info()["reason"] == "compiled"
    path = kc.kda_cpu_info()["path"]
    assert path.startswith(_native.cache_root()) and "/kernels/kda_cpu-" in path
    lib, how = kc._build()
    with lib:
        assert (lib.real_path, how) == (path, "cached")


# A library someone else could have planted: its constructor runs at load, before any check of ours.
_PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("KIMI_TEST_PLANTED_MARK"), "w");
    if (f) { fputs("ran", f); fclose(f); }
}
int kda_cpu_abi(void) { return 1; }
"""


def _plant(tmp_path, monkeypatch, dst):
    """Compile the planted library over `dst`; returns the file that appears if it is ever loaded."""
    src = tmp_path / "planted.c"
    src.write_text(_PLANTED_C)
    assert _native.compile_shared(_native.compiler(), str(src), str(dst), []) is None
    mark = tmp_path / "planted-ran"
    monkeypatch.setenv("KIMI_TEST_PLANTED_MARK", str(mark))
    return mark


def _reload():
    kc._tried = False
    kc._lib = None
    return kc.kda_cpu_info()


def _built_path():
    """Build (or find) the kernel without loading it: the dynamic loader would keep serving a
    path it has loaded once, and a victim process loads the planted file fresh."""
    lib, how = kc._build()
    assert lib is not None, how
    lib.close()
    return lib.real_path


def _record_for(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("how", ["replaced", "no record", "group-writable"])
def test_kernel_cached_library_is_verified_before_loading(kernel, fresh_load, tmp_path, monkeypatch, how):
    """A cached .so that doesn't match the sha256 recorded at build time (or has no record, or that
    others could have written) is rebuilt, never loaded."""
    path = _built_path()
    record = path + ".sha256"
    if how == "group-writable":  # our own build, but a group member could have swapped it
        mark = tmp_path / "planted-ran"
        os.chmod(path, 0o770)
    else:
        mark = _plant(tmp_path, monkeypatch, path)
        if how == "no record":
            os.unlink(record)
    info = _reload()
    assert not mark.exists(), "the planted library ran"
    assert info["available"] and info["path"] == path and info["reason"].startswith("compiled (the cached copy was refused")
    assert _reload()["reason"] == "cached"


def test_kernel_shared_cache_dir_is_not_trusted(kernel, fresh_load, tmp_path, monkeypatch):
    """KIMI_MLX_CACHE shared with other users (mode 1777): a library planted there at the computed
    name, with a matching record, owned by another user, must not run in our process."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create files owned by another user")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setenv("KIMI_MLX_CACHE", str(shared))
    path = _built_path()  # where a victim's build goes: learn the name
    mark = _plant(tmp_path, monkeypatch, path)
    with open(path + ".sha256") as f:
        key = f.read().split()[0]
    with open(path + ".sha256", "w") as f:
        f.write(f"{key} {_record_for(path)}\n")
    nobody = 65534
    for p in (shared / "kernels", path, path + ".sha256"):
        os.chown(p, nobody, nobody)
    info = _reload()
    assert not mark.exists(), "the planted library ran"
    assert info["available"] and not info["path"].startswith(str(shared))
    assert "owned by uid 65534" in info["reason"] and "private temporary directory" in info["reason"]


def test_kernel_cache_dirs_are_private(kernel, fresh_load, tmp_path):
    """Created 0700; an own directory left open by an older version is closed before it is used."""
    path = kc.kda_cpu_info()["path"]
    d = os.path.dirname(path)
    assert os.stat(d).st_mode & 0o777 == 0o700
    os.chmod(d, 0o777)
    assert _reload()["reason"] == "cached" and os.stat(d).st_mode & 0o777 == 0o700


def test_kernel_from_worker_thread(kernel):
    """The chat app runs generation on its own thread and MLX stream."""
    args, s0 = make_inputs(1, 70, 2, 16, 24, seed=18, state=True)
    box = {}

    def work():
        with mx.stream(mx.new_thread_local_stream(mx.default_device())):
            o, s = kda_mod.kda(*args, initial_state=s0)
            mx.eval(o, s)
            box["r"] = (o, s)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    _check(*box["r"], *kda_recurrent(*args, initial_state=s0))


def test_kernel_in_model_path(kernel, monkeypatch):
    """tiny_quant through kda_gated -> kda on the CPU: prefills run the C kernel (decode steps don't)
    and match the transformers oracle."""
    calls = _spy(monkeypatch, "kda_cpu")
    model = load_model(MODELS / "tiny_quant")
    g = golden("tiny_quant")
    ids = mx.array(g["ids"][:1, :200])
    cache = model.make_cache()
    outs = [model(ids[:, :65], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in (65, 66)]
    assert max_abs(outs[0][0], g["logits_65"]) < 1e-4
    n_kda = len(model.config.kda_layers)
    assert calls == ["kda_cpu"] * n_kda
    rest = model(ids[:, 67:200], cache=cache)
    assert calls == ["kda_cpu"] * (2 * n_kda)
    full = mx.concatenate(outs + [rest], axis=1)
    assert max_abs(full[0], g["logits_200"]) < 1e-4
