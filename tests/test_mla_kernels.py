"""The MLA attention kernels (metal_kernels/mla_template.py) through their launch code and the
attention dispatch, with the Metal text executed on the CPU (emulated threadgroups), against
the plain MLX-ops forms in kimi_mlx/ops/attention.py. Odd shapes on purpose: depths that are
not multiples of a segment or a tile, chunks that cross segments, batch 2, 8-bit caches,
several splits per segment, a prefill that continues from an earlier block's (o, lse)."""
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest

import metal_kernels
from metal_kernels import mla as K
from metal_kernels.emulate import cxx
from metal_kernels.sources import cuda_unit
from kimi_mlx.cache import MLACache
from kimi_mlx.ops import attention as A
from test_kernel_dispatch import _EmulatedKernel

pytestmark = pytest.mark.skipif(cxx() is None, reason="no C++ compiler")

DL, DR, NOPE, DV = 32, 16, 16, 16  # latent, rope, per-head nope and value widths (small)
D = DL + DR


@pytest.fixture
def emu(monkeypatch):
    log = []
    monkeypatch.delenv("KIMI_MLX_MLA", raising=False)
    monkeypatch.delenv("KIMI_MLX_KDA", raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(metal_kernels, "_kernel", lambda be, kind, *a: _EmulatedKernel(kind, log))
    monkeypatch.setattr(A, "_TRUSTED", {})  # each test checks its kernels on first use afresh
    return log


def _cache(rows, appends, page_tokens=64, bits=None, reserve=None):
    c = MLACache(page_tokens=page_tokens, bits=bits, group_size=32 if bits else 64)
    if reserve:
        c.reserve(reserve)
    pos = 0
    for n in appends:
        c.append(rows[:, pos:pos + n])
        pos += n
    return c


def _ref_decode(q, c, scale, q_offset):
    rows = mx.concatenate(c.blocks(), axis=1).astype(mx.float32)
    return A.latent_attention_reference(q.astype(mx.float32), rows, DL, scale, q_offset)


def decode_case(monkeypatch, B, H, T, appends, bits, splits, nbuf, bk, dt=mx.float32):
    """(out, fp32 reference) of one decode call: key buffers nbuf, tiles of bk keys, about `splits`
    splits a segment, the cache and the queries in dt (the reference sees the same rounded values)."""
    monkeypatch.setenv("KIMI_MLX_MLA_NBUF", nbuf)
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_BK", bk)
    monkeypatch.setattr(K, "_MIN_KEYS_PER_SPLIT", 32)
    monkeypatch.setenv("KIMI_MLX_MLA_TGS", str(splits))
    rng = np.random.default_rng(B * 100 + H + T)
    S = sum(appends)
    rows = mx.array(rng.standard_normal((B, S, D)).astype(np.float32)).astype(dt)
    c = _cache(rows, appends, bits=bits)
    q = mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)).astype(dt)
    return A.mla_decode_attention(q, c, 0.3, DL), _ref_decode(q, c, 0.3, S - T)


@pytest.mark.parametrize("B,H,T,appends,bits,splits", [
    (1, 4, 1, [37], None, 1),              # one short segment, one split
    (2, 4, 1, [70, 30, 1], None, 4),       # depth 101 over three segments, batch 2, several splits
    (1, 8, 3, [50, 47, 3], None, 2),       # three queries (causal inside the chunk), 24 rows
    (2, 4, 1, [100, 29], 8, 3),            # 8-bit segments, dequantized in the kernel
    (1, 40, 1, [45], None, 1),             # 40 heads: two row blocks, the second part-empty
    (1, 4, 1, [1300], None, 41),           # 41 splits: the combine's split groups, several rounds each
    (1, 4, 2, [700], None, 1),             # one split of many tiles: the streamed buffers wrap around
])
# nbuf 2: the next key tile is loaded during this one's math; bk: keys a tile
@pytest.mark.parametrize("nbuf,bk", [("1", "32"), ("2", "32"), ("2", "64")])
def test_kernel_mla_decode_matches_reference(emu, monkeypatch, B, H, T, appends, bits, splits, nbuf, bk):
    out, ref = decode_case(monkeypatch, B, H, T, appends, bits, splits, nbuf, bk)
    assert [k for k, _ in emu] and all(k in ("mla_decode", "mla_combine") for k, _ in emu)
    assert float(mx.abs(out - ref).max()) < 2e-5
    assert any(t.get("Q8") for k, t in emu if k == "mla_decode") == (bits == 8)
    assert all(t["NBUF"] == (1 if t["Q8"] else int(nbuf)) and t["BK"] == int(bk) for k, t in emu if k == "mla_decode")


@pytest.mark.parametrize("B,H,T,appends,bits,splits", [(2, 4, 1, [70, 30, 1], None, 4), (1, 8, 3, [50, 47, 3], 8, 2)])
def test_kernel_mla_decode_sixteen_warps(emu, monkeypatch, B, H, T, appends, bits, splits):
    """KIMI_MLX_MLA_DECODE_NW=16: each warp takes half of a tile's keys in S, 16 threads a softmax row."""
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_NW", "16")
    out, ref = decode_case(monkeypatch, B, H, T, appends, bits, splits, "1", "32")
    assert float(mx.abs(out - ref).max()) < 2e-5
    assert {t["NW"] for k, t in emu if k == "mla_decode"} == {16}


def test_kernel_mla_decode_bf16(emu):
    rng = np.random.default_rng(5)
    rows = mx.array(rng.standard_normal((1, 77, D)).astype(np.float32)).astype(mx.bfloat16)
    c = _cache(rows, [77])
    q = mx.array(rng.standard_normal((1, 4, 1, D)).astype(np.float32)).astype(mx.bfloat16)
    out = A.mla_decode_attention(q, c, 0.25, DL)
    ref = _ref_decode(q, c, 0.25, 76)
    assert out.dtype == mx.bfloat16
    assert float(mx.abs(out.astype(mx.float32) - ref).max()) < 2e-2


class _Expand:
    """kv_b_proj of the latent rows, per head (what KimiMLA._expand_kv / _expand compute)."""

    def __init__(self, H, rng):
        self.H = H
        self.w = mx.array(rng.standard_normal((DL, H * (NOPE + DV))).astype(np.float32) * 0.2)

    def kv(self, rows):
        B, n, _ = rows.shape
        return (rows[..., :DL] @ self.w.astype(rows.dtype)).reshape(B, n, self.H, NOPE + DV)

    def kv_split(self, rows):
        B, n, _ = rows.shape
        kv = self.kv(rows).transpose(0, 2, 1, 3)
        k_pe = mx.broadcast_to(rows[:, None, :, DL:], (B, self.H, n, DR))
        return mx.concatenate([kv[..., :NOPE], k_pe], axis=-1), kv[..., NOPE:]


def prefill_case(monkeypatch, B, H, T, before, bits, block_keys, dt=mx.float32):
    """(out, fp32 reference) of one expanded prefill chunk of T queries after `before` cached
    tokens, the cache expanded block_keys at a time (None: at once), the cache and the queries in
    dt (the reference gets the same rounded values in fp32)."""
    if block_keys:
        monkeypatch.setattr(A, "EXPAND_BLOCK_BYTES", block_keys * B * H * (NOPE + DV) * dt.size)
        monkeypatch.setattr(A, "EXPAND_MIN_KEYS", 1)
    rng = np.random.default_rng(T + 7 * B)
    S0 = sum(before)
    rows = mx.array(rng.standard_normal((B, S0 + T, D)).astype(np.float32)).astype(dt)
    c = _cache(rows, [n for n in before if n] + [T], page_tokens=48, bits=bits)
    q = mx.array(rng.standard_normal((B, T, H, NOPE + DR)).astype(np.float32)).astype(dt)
    ex = _Expand(H, rng)

    def split32(r):  # the kernel's kv (computed in dt), in fp32
        kv = ex.kv(r.astype(dt)).astype(mx.float32).transpose(0, 2, 1, 3)
        k_pe = mx.broadcast_to(r[:, None, :, DL:].astype(mx.float32), (r.shape[0], H, r.shape[1], DR))
        return mx.concatenate([kv[..., :NOPE], k_pe], axis=-1), kv[..., NOPE:]

    out = A.mla_prefill_attention(q, c, ex.kv, 0.2, DR, DV, expand=ex.kv_split)
    blocks = [b.astype(mx.float32) for b in c.blocks()]
    ref = A.expanded_attention(q.astype(mx.float32).transpose(0, 2, 1, 3), blocks, split32, 0.2, S0)
    return out, ref.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("B,H,T,before,bits,block_keys", [
    (1, 2, 70, [0], None, None),         # a chunk from position 0, not a multiple of the tile
    (2, 2, 40, [50, 31], None, None),    # depth 81 over two segments, batch 2
    (1, 3, 33, [90], None, 32),          # the cache expanded 32 keys at a time (continued partials)
    (1, 2, 20, [45], 8, None),           # an 8-bit cache, dequantized block by block
])
# nbuf 2: the next key tile is loaded during this one's math; rw 2: two 16-row query tiles a warp
# (with 2 warps, so that a 70-query chunk spans two threadgroups of 64)
@pytest.mark.parametrize("nbuf,rw", [("1", "1"), ("2", "1"), ("2", "2")])
def test_kernel_mla_prefill_matches_reference(emu, monkeypatch, B, H, T, before, bits, block_keys, nbuf, rw):
    monkeypatch.setenv("KIMI_MLX_MLA_NBUF", nbuf)
    monkeypatch.setenv("KIMI_MLX_MLA_PREFILL_RW", rw)
    if rw == "2":
        monkeypatch.setenv("KIMI_MLX_MLA_PREFILL_NW", "2")
    out, ref = prefill_case(monkeypatch, B, H, T, before, bits, block_keys)
    prefills = [t for k, t in emu if k == "mla_prefill"]
    assert prefills and all(p["NBUF"] == int(nbuf) and p["RW"] == int(rw) for p in prefills)
    if block_keys:
        assert len(prefills) > 1 and prefills[-1]["HAS_INIT"]
    assert float(mx.abs(out - ref).max()) < 2e-5


@pytest.mark.slow
def test_kernel_mla_long_chunk_at_depth(emu):
    """T = 2048 queries at depth 10K (and the T = 1 step after them)."""
    rng = np.random.default_rng(11)
    H, S0, T = 2, 10_000, 2048
    rows = mx.array(rng.standard_normal((1, S0 + T + 1, D)).astype(np.float32) * 0.5)
    c = _cache(rows, [S0, T], page_tokens=4096, reserve=S0)
    q = mx.array(rng.standard_normal((1, T, H, NOPE + DR)).astype(np.float32) * 0.5)
    ex = _Expand(H, rng)
    out = A.mla_prefill_attention(q, c, ex.kv, 0.2, DR, DV, expand=ex.kv_split)
    ref = A.expanded_attention(q.transpose(0, 2, 1, 3), c.blocks(), ex.kv_split, 0.2, S0).transpose(0, 2, 1, 3)
    assert float(mx.abs(out - ref).max()) < 5e-5
    c.append(rows[:, S0 + T:])
    qd = mx.array(rng.standard_normal((1, H, 1, D)).astype(np.float32))
    out = A.mla_decode_attention(qd, c, 0.3, DL)
    assert float(mx.abs(out - _ref_decode(qd, c, 0.3, S0 + T)).max()) < 2e-5


def test_kernel_mla_first_use_check_on_metal(emu, monkeypatch):
    """On Metal each kernel instance is checked once against the plain path before use: a good
    one is used from then on; a wrong one (here: a combine that returns zeros) warns and the
    plain path answers."""
    rng = np.random.default_rng(3)
    rows = mx.array(rng.standard_normal((1, 50, D)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 4, 1, D)).astype(np.float32))
    c = _cache(rows, [50])
    out = A.mla_decode_attention(q, c, 0.3, DL)
    assert list(A._TRUSTED.values()) == [True] and len(emu) == 4  # the check's 2 kernels, then the call's
    assert float(mx.abs(out - _ref_decode(q, c, 0.3, 49)).max()) < 2e-5

    monkeypatch.setattr(A, "_TRUSTED", {})
    monkeypatch.setattr(K, "mla_combine", lambda parts, dtype: mx.zeros(parts[0][0].shape[:1] + parts[0][0].shape[2:], dtype))
    with pytest.warns(RuntimeWarning, match="differs from the plain path"):
        out = A.mla_decode_attention(q, c, 0.3, DL)
    assert list(A._TRUSTED.values()) == [False]
    assert float(mx.abs(out - _ref_decode(q, c, 0.3, 49)).max()) < 1e-5


def test_kernel_mla_reference_env_and_cpu(monkeypatch):
    monkeypatch.setenv("KIMI_MLX_MLA", "reference")
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert K.backend() is None
    monkeypatch.delenv("KIMI_MLX_MLA")
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert K.backend() is None or mx.default_device().type != mx.DeviceType.cpu


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
@pytest.mark.parametrize("kind", ["mla_decode", "mla_decode_q8", "mla_combine", "mla_prefill"])
def test_kernel_mla_cuda_text_compiles_for_sm90(tmp_path, kind):
    """The CUDA twin at the real widths, bf16, as MLX's JIT would lay it out (nvcc, no GPU)."""
    bf = "bfloat16"
    if kind.startswith("mla_decode"):
        q8 = kind.endswith("q8")
        kind = "mla_decode"
        tmpl = [("T", bf), ("ST", bf), ("PR", 0), ("D", 576), ("DV", 512), ("NW", 8), ("BK", 64 if q8 else 32), ("Q8", q8),
                ("QG", 64), ("DQ", 576), ("NBUF", 1 if q8 else 2), ("G", 1 if q8 else 2),
                ("QREG", q8), ("BULK", False)]
        ins = dict(q=bf, rows=bf, wq="uint32", scales=bf, biases=bf, info="int32", info_f="float32")
        outs = dict(o_part="float32", lse_part="float32")
    elif kind == "mla_combine":
        tmpl, outs = [("T", bf), ("DV", 512), ("NTC", 256), ("CW", 64), ("TWO", True)], dict(o=bf)
        ins = dict(o_part="float32", lse_part="float32", o_tail="float32", lse_tail="float32")
    else:
        tmpl = [("T", bf), ("ST", bf), ("PR", 0), ("NOPE", 128), ("DR", 64), ("DV", 128), ("DL", 512),
                ("D", 576), ("NW", 8), ("RW", 1), ("HAS_INIT", True), ("QREG", True), ("NBUF", 2)]
        ins = dict(q=bf, kv=bf, rows=bf, o_in="float32", lse_in="float32", info="int32", info_f="float32")
        outs = dict(o="float32", lse="float32")
    src = tmp_path / "k.cu"
    src.write_text(cuda_unit(kind, tmpl, ins, outs))
    r = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-o", str(tmp_path / "k.o"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("probe", ["loads", "math"])
def test_decode_probe_builds_run(emu, monkeypatch, probe):
    """scripts/mla_decode_parts.py --probe cuts the math or the streamed loads out of DECODE_BODY by
    its text: the cut must still find its marks in the kernel and run (its results are garbage)."""
    import importlib.util
    from pathlib import Path

    from metal_kernels import mla_template

    path = Path(__file__).resolve().parents[1] / "scripts" / "mla_decode_parts.py"
    spec = importlib.util.spec_from_file_location("mla_decode_parts", path)
    parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parts)
    body = parts.probe_body(mla_template.DECODE_BODY, probe)
    assert body != mla_template.DECODE_BODY and ("S = Q K^T" in body) == (probe == "math")
    monkeypatch.setitem(mla_template._BODIES, "mla_decode", body)
    monkeypatch.setenv("KIMI_MLX_MLA_DECODE_BK", "64")
    rng = np.random.default_rng(3)
    rows = mx.array(rng.standard_normal((1, 200, D)).astype(np.float32))
    q = mx.array(rng.standard_normal((1, 4, D)).astype(np.float32))
    o, lse = K.mla_decode_partial(q, rows, 200, 0, 199, 4, 0.3, DL)
    assert o.shape[-1] == DL and [k for k, _ in emu] == ["mla_decode"]
    # no scores (loads): every split is empty; the math on the tiles as loaded: finite sums
    assert bool(mx.all(mx.isinf(lse)).item()) == (probe == "loads")
