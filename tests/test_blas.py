"""BLAS preload (kimi_mlx._blas): each case runs in a fresh interpreter, because the choice is made
once, before mlx.core is imported."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")

# Prints blas_info() as JSON and saves an fp32 matmul and an inverse (a LAPACK call) for comparison.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import kimi_mlx, kimi_mlx._blas as b
    import mlx.core as mx
    rng = np.random.default_rng(0)
    a = mx.array(rng.standard_normal((67, 130), dtype=np.float32))
    c = mx.array(rng.standard_normal((130, 129), dtype=np.float32))
    m = mx.array(rng.standard_normal((24, 24), dtype=np.float32) + 6 * np.eye(24, dtype=np.float32))
    inv = mx.linalg.inv(m, stream=mx.cpu)
    np.savez(sys.argv[1], mm=np.array(a @ c), inv=np.array(inv))
    print(json.dumps(b.blas_info()))
""")


def _has_system_openblas() -> bool:
    from kimi_mlx import _blas

    return any(os.path.exists(p) for p in _blas._SYSTEM_CANDIDATES if os.sep in p)


def _has_scipy_openblas() -> bool:
    from kimi_mlx import _blas

    return _blas._scipy_openblas() is not None


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg_cache")  # keeps probes and the shim out of the user's cache


def run(tmp_path, cache, blas: str | None, name: str):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    env.pop("KIMI_MLX_BLAS", None)
    if blas is not None:
        env["KIMI_MLX_BLAS"] = blas
    out = tmp_path / f"{name}.npz"
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    return info, dict(np.load(out)), r.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    return run(tmp_path_factory.mktemp("ref"), cache, "off", "off")


def _same(res, ref):
    np.testing.assert_allclose(res["mm"], ref["mm"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res["inv"], ref["inv"], rtol=1e-4, atol=1e-5)


def test_off_keeps_reference(reference):
    info, res, _ = reference
    assert info["loaded"] is False and info["source"] == "reference"
    assert "KIMI_MLX_BLAS" in info["reason"]


def test_auto_loads_and_matches(tmp_path, cache, reference):
    if not (_has_system_openblas() or (_has_scipy_openblas() and shutil.which("cc"))):
        pytest.skip("no optimized BLAS available on this machine")
    info, res, _ = run(tmp_path, cache, None, "auto")
    assert info["loaded"] is True and info["source"] in ("system", "scipy-openblas32"), info
    _same(res, reference[1])


def test_missing_path_falls_back(tmp_path, cache, reference):
    info, res, err = run(tmp_path, cache, str(tmp_path / "no-such-libblas.so"), "missing")
    assert any("no such file" in n for n in info.get("notes", [])) or "no such file" in info["reason"]
    assert "RuntimeWarning" in err
    _same(res, reference[1])


def test_library_without_sgemm_is_rejected(tmp_path, cache, reference):
    import ctypes.util

    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to point at")
    info, res, _ = run(tmp_path, cache, libm, "libm")
    assert info["source"] != "env"
    assert any("probe" in n for n in info.get("notes", [])), info
    _same(res, reference[1])


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_crashing_library_is_rejected(tmp_path, cache, reference):
    # a BLAS that dies on its first sgemm (like a wheel built for newer CPUs) must not kill us
    src = tmp_path / "bad.c"
    src.write_text("void cblas_sgemm(void) { __builtin_trap(); }\n")
    lib = tmp_path / "libbadblas.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    info, res, _ = run(tmp_path, cache, str(lib), "bad")
    assert info["source"] != "env"
    assert any("probe" in n for n in info.get("notes", [])), info
    _same(res, reference[1])


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_scipy_openblas_shim(tmp_path, cache, reference):
    if not _has_scipy_openblas():
        pytest.skip("scipy-openblas32 is not installed")
    info, res, _ = run(tmp_path, cache, "scipy", "scipy")  # `scipy` skips the system library
    assert info["source"] == "scipy-openblas32", info
    assert "libkimi_blas_shim" in info["path"]
    assert list(cache.glob("kimi_mlx/blas/libkimi_blas_shim-*.so"))
    _same(res, reference[1])


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_planted_shim_is_not_loaded(tmp_path, reference, monkeypatch):
    """A shim replaced after it was built (its recorded sha256 no longer matches) is rebuilt; the
    replacement never runs, not even in the probe subprocess."""
    if not _has_scipy_openblas():
        pytest.skip("scipy-openblas32 is not installed")
    cache = tmp_path / "cache"
    run(tmp_path, cache, "scipy", "first")
    (shim,) = cache.glob("kimi_mlx/blas/libkimi_blas_shim-*.so")
    assert (cache / "kimi_mlx" / "blas").stat().st_mode & 0o777 == 0o700
    mark = tmp_path / "planted-ran"
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                   f'{{ FILE *f = fopen("{mark}", "w"); if (f) fclose(f); }}\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(src)], check=True)
    info, res, _ = run(tmp_path, cache, "scipy", "second")
    assert not mark.exists(), "the planted shim ran"
    assert info["source"] == "scipy-openblas32" and "refused" in info["reason"], info
    _same(res, reference[1])


def test_too_late_after_mlx(tmp_path):
    code = "import mlx.core, json, kimi_mlx._blas as b; b.preload(); print(json.dumps(b.blas_info()))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["loaded"] is False and "too late" in info["reason"]


def test_shim_source_forwards_prefixed_names():
    from kimi_mlx import _blas

    class FakeLib:  # exports the prefixed sgemm and one LAPACK routine only
        scipy_cblas_sgemm = scipy_sgetrf_ = object()

    src, names = _blas.shim_source(FakeLib())
    assert names == ["cblas_sgemm", "sgetrf_"]
    assert "scipy_cblas_sgemm(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc)" in src
    assert "void sgetrf_(void *p0, void *p1, void *p2, void *p3, void *p4, void *p5)" in src
