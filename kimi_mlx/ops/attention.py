"""Blockwise causal attention over a shared (single-head) latent cache, online softmax.

Used by NoPE MLA in its absorbed form: every head attends to the same rows
[latent | k_pe], and the values are the latent part of those rows. Scores are built
for one (query block x key block) tile at a time, so peak memory grows linearly with
context and never holds a queries x keys x heads tensor.
"""
from __future__ import annotations

import mlx.core as mx

# Largest score tile, in elements (B * H * queries * keys); 2**23 fp32 = 32 MiB.
TILE_ELEMS = 1 << 23


def latent_attention(
    q: mx.array,
    blocks: list[mx.array],
    d_v: int,
    scale: float,
    q_offset: int,
    block_k: int = 1024,
    tile_elems: int = TILE_ELEMS,
) -> mx.array:
    """q: [B, H, T, D]; blocks: rows [B, n_i, D] in token order (values = rows[..., :d_v]).

    Query t sits at absolute position q_offset + t and sees keys 0..q_offset + t.
    Returns [B, H, T, d_v] in q's dtype.
    """
    B, H, T, D = q.shape
    # MLX's CPU backend multiplies bf16/fp16 without BLAS (~10x slower than fp32): on the CPU the
    # cached rows are widened block by block (a cheap copy next to the matmuls) and the math runs in fp32
    widen = mx.default_device().type == mx.DeviceType.cpu and q.dtype == mx.float32
    keys = []  # (absolute start, [B, n, D]) sub-blocks of at most block_k rows
    pos = 0
    for blk in blocks:
        n = blk.shape[1]
        for s in range(0, n, block_k):
            keys.append((pos + s, blk[:, s:s + block_k]))
        pos += n
    bq = max(1, min(T, tile_elems // max(1, B * H * block_k)))
    outs = []
    for qs in range(0, T, bq):
        qb = q[:, :, qs:qs + bq]
        tq = qb.shape[2]
        first_q, last_q = q_offset + qs, q_offset + qs + tq - 1
        qflat = qb.reshape(B, H * tq, D)
        m = l = acc = None
        visible = [(ks, kb) for ks, kb in keys if ks <= last_q]
        big = len(visible) > 2 and B * H * tq * block_k >= (1 << 20)
        for ks, kb in visible:
            if widen and kb.dtype != mx.float32:
                kb = kb.astype(mx.float32)
            kn = kb.shape[1]
            s = (qflat @ kb.transpose(0, 2, 1)).reshape(B, H, tq, kn).astype(mx.float32) * scale
            if ks + kn - 1 > first_q:  # tile crosses the diagonal
                qpos = mx.arange(first_q, first_q + tq)[:, None]
                kpos = mx.arange(ks, ks + kn)[None, :]
                s = mx.where(kpos <= qpos, s, -mx.inf)
            s_max = s.max(axis=-1, keepdims=True)
            v = kb[:, :, :d_v]  # [B, kn, d_v], shared by all heads

            def pv(p):  # heads folded into rows: one matmul (a head-broadcast one is ~30x slower on the CPU)
                return (p.astype(v.dtype).reshape(B, H * tq, kn) @ v).reshape(B, H, tq, d_v).astype(mx.float32)

            if m is None:
                m = s_max
                p = mx.exp(s - m)
                l = p.sum(axis=-1, keepdims=True)
                acc = pv(p)
            else:
                m_new = mx.maximum(m, s_max)
                corr = mx.exp(m - m_new)
                p = mx.exp(s - m_new)
                l = l * corr + p.sum(axis=-1, keepdims=True)
                acc = acc * corr + pv(p)
                m = m_new
            if big:  # keep at most one score tile alive on long contexts
                mx.eval(m, l, acc)
        outs.append((acc / l).astype(q.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def latent_attention_reference(q, rows, d_v, scale, q_offset):
    """Plain full-matrix version (tests only): q [B,H,T,D], rows [B,S,D]."""
    B, H, T, D = q.shape
    S = rows.shape[1]
    s = (q.astype(mx.float32) @ rows.astype(mx.float32)[:, None].transpose(0, 1, 3, 2)) * scale
    mask = mx.arange(S)[None, :] <= (q_offset + mx.arange(T))[:, None]
    s = mx.where(mask, s, -mx.inf)
    p = mx.softmax(s, axis=-1)
    return (p @ rows.astype(mx.float32)[:, None, :, :d_v]).astype(q.dtype)
