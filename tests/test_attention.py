"""Blockwise latent attention vs the plain full-matrix version, and its memory bound."""
import mlx.core as mx
import numpy as np
import pytest

from kimi_mlx.ops.attention import latent_attention, latent_attention_reference
from kimi_mlx.cache import MLACache
from helpers import max_abs


@pytest.mark.parametrize("B,H,T,S,off,blk", [(1, 2, 1, 1, 0, 4), (2, 3, 17, 17, 0, 5), (1, 2, 9, 40, 31, 8),
                                              (2, 1, 33, 100, 67, 16), (1, 4, 1, 300, 299, 64)])
def test_blockwise_matches_reference(B, H, T, S, off, blk):
    mx.random.seed(0)
    D, dv = 24, 16
    q = mx.random.normal((B, H, T, D))
    rows = mx.random.normal((B, S, D))
    ref = latent_attention_reference(q, rows, dv, 0.3, off)
    # split the rows into uneven pages as the cache does
    pages = [rows[:, : S // 3], rows[:, S // 3:]] if S > 3 else [rows]
    out = latent_attention(q, pages, dv, 0.3, off, block_k=blk, tile_elems=B * H * blk * 3)
    assert max_abs(out, ref) < 1e-5


def test_quantized_cache_pages_close():
    mx.random.seed(1)
    c8, c = MLACache(page_tokens=16, bits=8, group_size=32), MLACache(page_tokens=16)
    rows = mx.random.normal((2, 50, 64))
    for a, b in ((0, 7), (7, 30), (30, 31), (31, 50)):
        c.append(rows[:, a:b]); c8.append(rows[:, a:b])
    full = mx.concatenate(c.blocks(), axis=1)
    assert max_abs(full, rows) == 0.0
    q = mx.concatenate(c8.blocks(), axis=1)
    err = float(mx.abs(q - rows).max() / mx.abs(rows).max())
    assert err < 0.02 and c8.offset == 50
    assert c8.nbytes < 0.6 * c.nbytes * 50 / 64 + 2 * 16 * 64 * 4  # 8-bit pages are about a quarter of fp32


def test_long_prefill_memory_is_linear():
    """16K queries x 16K keys x 4 heads would be 4 GiB of fp32 scores; the tiles keep peak far below."""
    mx.random.seed(2)
    B, H, S, D, dv = 1, 4, 16384, 40, 32
    rows = (mx.random.normal((B, S, D)) * 0.5).astype(mx.float32)
    q = mx.random.normal((B, H, S, D)) * 0.5
    mx.eval(rows, q)
    cache = MLACache(page_tokens=4096)
    cache.append(rows)
    mx.eval(cache.eval_arrays())
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = latent_attention(q, cache.blocks(), dv, 0.2, 0)
    mx.eval(out)
    peak = mx.get_peak_memory() - base
    full_scores = B * H * S * S * 4
    assert peak < full_scores / 16, (peak, full_scores)
    assert peak < 256 * 2**20
    # check the last 64 queries against the full-matrix reference on those rows
    tail = latent_attention_reference(q[:, :, -64:], rows, dv, 0.2, S - 64)
    assert max_abs(out[:, :, -64:], tail) < 1e-4


def test_cache_segments_reserve_growth_and_snapshots():
    """Appends fill one reserved segment in place; without a reserve new segments grow with the
    cache (about an eighth of it), never by copying; a snapshot is never modified by later appends."""
    mx.random.seed(3)
    rows = mx.random.normal((2, 300, 24))
    c = MLACache(page_tokens=16)
    c.reserve(300)
    for a, b in ((0, 20), (20, 200), (200, 300)):
        c.append(rows[:, a:b])
    assert len(c.segments()) == 1 and c.segments()[0]["cap"] == 300
    assert max_abs(mx.concatenate(c.blocks(), axis=1), rows) == 0.0

    g = MLACache(page_tokens=16)
    for a in range(0, 300, 17):
        g.append(rows[:, a:a + 17])
    caps = [s["cap"] for s in g.segs]
    assert sum(s["n"] for s in g.segs) == 300 and sum(caps) - 300 < max(16, 300 // 8) + 16
    assert all(c2 >= 16 for c2 in caps) and len(caps) < 300 // 16
    assert [s["start"] for s in g.segs] == [sum(s2["n"] for s2 in g.segs[:i]) for i in range(len(caps))]
    assert max_abs(mx.concatenate(g.blocks(), axis=1), rows) == 0.0

    snap = g.copy()
    g.append(rows[:, :3] * 0 + 7)
    assert snap.offset == 300 and max_abs(mx.concatenate(snap.blocks(), axis=1), rows) == 0.0
    assert g.offset == 303 and float(g.blocks()[-1][:, -1].min()) == 7.0

    # saved and loaded (sessions): one segment sized exactly, 8-bit ones dequantized
    for bits in (None, 8):
        src = MLACache(page_tokens=16, bits=bits, group_size=32 if bits else 64)
        src.append(rows[:, :100])
        dst = MLACache(page_tokens=16, bits=bits, group_size=32 if bits else 64)
        dst.load_arrays(src.arrays(), 100)
        assert len(dst.segments()) == 1 and dst.segments()[0]["cap"] == 100
        assert max_abs(dst.arrays()["kv"], src.arrays()["kv"]) < (0.05 if bits else 0.0) + 1e-7


@pytest.mark.parametrize("bits", [None, 8])
def test_cache_decode_appends_never_touch_the_prefilled_segment(bits):
    """Decode steps append to a small tail: the prefilled segment is never written again (a
    pipelined step still reads it, so writing it would copy the whole context every token). Full
    tails close and merge pairwise, so closed decode segments stay few, sizes decreasing."""
    mx.random.seed(4)
    rows = mx.random.normal((2, 700, 64))
    c = MLACache(page_tokens=16, bits=bits, group_size=32 if bits else 64)
    c.reserve(700)
    c.append(rows[:, :100])
    big = c.segs[0]["data"]
    mx.eval(big)
    for t in range(100, 600):
        c.append(rows[:, t:t + 1])
        assert c.segs[0]["data"] is big and c.segs[0]["n"] == 100
        small = [s["n"] for s in c.segs[1:] if not s.get("tail")]
        assert small == sorted(small, reverse=True) and len(set(small)) == len(small)
        assert len(c.segs) <= 2 + (t - 100).bit_length()
    c.append(rows[:, 600:640])  # a long append after decode (the next turn) starts a new segment
    c.append(rows[:, 640:643])
    assert c.offset == 643 and [s["start"] for s in c.segs] == [sum(s2["n"] for s2 in c.segs[:i]) for i in range(len(c.segs))]
    tol = 0.05 if bits else 0.0
    assert max_abs(mx.concatenate(c.blocks(), axis=1), rows[:, :643]) <= tol
    snap = c.copy()
    c.append(rows[:, :1] * 0 + 9)
    assert max_abs(mx.concatenate(snap.blocks(), axis=1), rows[:, :643]) <= tol
    assert float(c.blocks()[-1][:, -1].min()) == pytest.approx(9.0, abs=0.05)


def test_prefill_reserves_one_mla_segment():
    """A document prefilled in many chunks lands in one MLA segment (one kernel call per layer)."""
    from helpers import MODELS

    from kimi_mlx import load_model
    from kimi_mlx.session import prefill

    model = load_model(MODELS / "tiny_grouped")
    cache = model.make_cache()
    mla = [c for c in cache if c.kind == "mla"]
    for c in mla:
        c.page_tokens = 32  # small segments unless the prefill reserves one
    prefill(model, list(range(1, 300)), cache, step=64)
    assert mla and all(len(c.segments()) == 1 and c.segments()[0]["cap"] == 299 for c in mla)
