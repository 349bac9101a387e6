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


def _widen(q) -> bool:
    # MLX's CPU backend multiplies bf16/fp16 without BLAS (~10x slower than fp32): on the CPU the
    # cached rows are widened block by block (a cheap copy next to the matmuls) and the math runs in fp32
    return mx.default_device().type == mx.DeviceType.cpu and q.dtype == mx.float32


def _key_blocks(blocks, block_k):
    """(absolute start, [B, n, D]) sub-blocks of at most block_k rows, in token order."""
    keys, pos = [], 0
    for blk in blocks:
        n = blk.shape[1]
        for s in range(0, n, block_k):
            keys.append((pos + s, blk[:, s:s + block_k]))
        pos += n
    return keys


def _causal(s, first_q, ks):
    """Mask a [.., tq, kn] score tile of queries from first_q and keys from ks, if it crosses the diagonal."""
    tq, kn = s.shape[-2:]
    if ks + kn - 1 <= first_q:
        return s
    qpos = mx.arange(first_q, first_q + tq)[:, None]
    kpos = mx.arange(ks, ks + kn)[None, :]
    return mx.where(kpos <= qpos, s, -mx.inf)


def _online_softmax(m, l, acc, s, pv):
    """One key tile of the online softmax: running max m, normaliser l, output acc (all fp32)."""
    s_max = s.max(axis=-1, keepdims=True)
    if m is None:
        p = mx.exp(s - s_max)
        return s_max, p.sum(axis=-1, keepdims=True), pv(p)
    m_new = mx.maximum(m, s_max)
    corr = mx.exp(m - m_new)
    p = mx.exp(s - m_new)
    return m_new, l * corr + p.sum(axis=-1, keepdims=True), acc * corr + pv(p)


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
    widen = _widen(q)
    keys = _key_blocks(blocks, block_k)
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
            s = _causal(s, first_q, ks)
            v = kb[:, :, :d_v]  # [B, kn, d_v], shared by all heads

            def pv(p):  # heads folded into rows: one matmul (a head-broadcast one is ~30x slower on the CPU)
                return (p.astype(v.dtype).reshape(B, H * tq, kn) @ v).reshape(B, H, tq, d_v).astype(mx.float32)

            m, l, acc = _online_softmax(m, l, acc, s, pv)
            if big:  # keep at most one score tile alive on long contexts
                mx.eval(m, l, acc)
        outs.append((acc / l).astype(q.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def expanded_attention(q, blocks, expand, scale, q_offset, block_k: int = 1024,
                       tile_elems: int = TILE_ELEMS):
    """The non-absorbed form, for long prefill chunks: per-head keys/values are expanded from
    the cached rows one key block at a time (once per block, for every query block), so the
    scores run over qk_head_dim instead of kv_lora_rank + rope.

    q [B, H, T, Dk]; blocks: rows [B, n_i, D]; expand(rows) -> (k [B, H, n, Dk], v [B, H, n, Dv]).
    Returns [B, H, T, Dv] in q's dtype. Peak memory: one expanded key block and one score tile
    per query block at a time, plus the running outputs.
    """
    B, H, T, _ = q.shape
    widen = _widen(q)
    bq = max(1, min(T, tile_elems // max(1, B * H * block_k)))
    qblocks = [(q_offset + qs, q[:, :, qs:qs + bq]) for qs in range(0, T, bq)]
    state = [(None, None, None)] * len(qblocks)
    keys = [(ks, kb) for ks, kb in _key_blocks(blocks, block_k) if ks <= q_offset + T - 1]
    big = len(keys) > 2 and B * H * T * block_k >= (1 << 20)
    for ks, kb in keys:
        k, v = expand(kb.astype(mx.float32) if widen and kb.dtype != mx.float32 else kb)
        kt = k.astype(q.dtype).transpose(0, 1, 3, 2)  # once per key block, for every query block
        for i, (first_q, qb) in enumerate(qblocks):
            if ks > first_q + qb.shape[2] - 1:
                continue  # every key of this block is in these queries' future
            s = _causal((qb @ kt).astype(mx.float32) * scale, first_q, ks)
            state[i] = _online_softmax(*state[i], s,
                                       lambda p: (p.astype(v.dtype) @ v).astype(mx.float32))
        if big:  # keep one expanded block and its tiles alive at a time
            mx.eval([x for st in state if st[0] is not None for x in st])
    outs = [(acc / l).astype(q.dtype) for _, l, acc in state]
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
