"""Kernel source generation and the C++ compile check of the Metal text (`pytest -k kernel`).

Apple's Metal compiler is not available on Linux; the Metal source MLX would build is compiled
by g++ against metal_stub.h, which declares the Metal types and builtins the kernels use, so
a typo or an undeclared name fails here. The CUDA text is generated from the same template."""
import pytest

from metal_kernels import kda_template
from metal_kernels.dialect import CUDA, METAL
from metal_kernels.emulate import compile_unit, cxx
from metal_kernels.kda_template import prefill_smem_floats, render
from metal_kernels.sources import cuda_unit, metal_unit

needs_cxx = pytest.mark.skipif(cxx() is None, reason="no C++ compiler")


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_kernel_sources_one_algorithm_two_dialects(kind):
    (mh, mb), (ch, cb) = render(METAL, kind), render(CUDA, kind)
    body = kda_template.PREFILL_BODY if kind == "prefill" else kda_template.DECODE_BODY
    # each body is the shared template with only the dialect snippets substituted
    for d, b in ((METAL, mb), (CUDA, cb)):
        expect = body.replace("/*@PROLOGUE@*/", d.prologue)
        if kind == "prefill":
            expect = expect.replace("/*@SMEM@*/", d.smem)
        assert b == expect
    assert kda_template.COMMON_HEADER in mh and kda_template.COMMON_HEADER in ch
    for word in ("__syncthreads", "__shfl_xor_sync", "mma.sync", "__shared__"):
        assert word not in mh + mb
    for word in ("threadgroup_barrier", "simd_shuffle", "simdgroup_matrix", "metal::"):
        assert word not in ch + cb


def _prefill_template(dt, K, BV, NT, init, pf, split=False, ts="float32"):
    return [("T", dt), ("K", K), ("V", 128), ("BV", BV), ("NT", NT), ("HAS_INIT", init),
            ("PI", 0), ("PS", 0), ("PF", pf), ("SPLIT", split), ("TS", ts), ("LA", 8),
            ("SMEM_FLOATS", prefill_smem_floats(K, BV))]


def _prefill_io(dt, ts="float32"):
    ind = {n: dt for n in ("q_raw", "k_raw", "v", "f", "b_raw")}
    ind.update(dt_bias="float32", A_log="float32", init_state="float32", sync="int32")
    return ind, dict(o=dt, state_out="float32", xs=ts, xf="float32", scratch="float32")


@needs_cxx
@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("K,BV,NT,init,pf,split", [(128, 32, 512, True, False, False),
                                                   (128, 64, 256, False, True, False),
                                                   (64, 16, 128, True, True, False),
                                                   (128, 32, 512, True, False, True)])
def test_kernel_metal_prefill_compiles_as_cxx(tmp_path, dt, K, BV, NT, init, pf, split):
    ind, outd = _prefill_io(dt)
    src = metal_unit("prefill", _prefill_template(dt, K, BV, NT, init, pf, split), ind, outd)
    compile_unit(src, tmp_path / "prefill", syntax_only=True)


@needs_cxx
@pytest.mark.parametrize("dt,gated,kc,lr", [("float32", True, 0, False), ("bfloat16", False, 0, False),
                                            ("float16", True, 0, False), ("bfloat16", True, 4, True)])
def test_kernel_metal_decode_compiles_as_cxx(tmp_path, dt, gated, kc, lr):
    names = ("q_raw", "k_raw", "v", "f", "b_raw", "norm_w", "gate", "conv_state", "conv_w", "f_w", "g_w")
    ind = {n: dt for n in names}
    ind.update(dt_bias="float32", A_log="float32", state="float32", eps="float32")
    bvd = 128 if gated else 32
    tmpl = [("T", dt), ("K", 128), ("V", 128), ("BVD", bvd), ("NTD", bvd * 4), ("GATED", gated), ("KC", kc), ("LR", lr)]
    src = metal_unit("decode", tmpl, ind, dict(o=dt, state_out="float32", conv_out=dt))
    compile_unit(src, tmp_path / "decode", syntax_only=True)


@needs_cxx
def test_kernel_metal_stub_rejects_a_typo(tmp_path):
    """The check has teeth: an undeclared Metal name does not compile."""
    ind, outd = _prefill_io("float32")
    src = metal_unit("prefill", _prefill_template("float32", 64, 16, 128, False, False), ind, outd)
    bad = src.replace("threadgroup_barrier(", "threadgroup_barier(", 1)
    assert bad != src
    with pytest.raises(RuntimeError, match="threadgroup_barier"):
        compile_unit(bad, tmp_path / "bad", syntax_only=True)


def test_kernel_cuda_unit_is_generated():
    ind, outd = _prefill_io("bfloat16", "bfloat16")
    src = cuda_unit("prefill", _prefill_template("bfloat16", 128, 32, 512, True, False, True, "bfloat16"),
                    ind, outd)
    assert 'extern "C" __global__ void kda_kernel(' in src
    assert "using T = __nv_bfloat16;" in src and "constexpr int K = 128;" in src
