"""MLA attention: the dispatch between our kernels and the plain MLX-ops forms, and those forms.

`mla_decode_attention` (absorbed form: every head attends to the same rows [latent | k_pe],
values = the latent part) and `mla_prefill_attention` (expanded form: per-head keys/values from
kv_b_proj, block by block) run the kernels of metal_kernels/mla.py on an Apple or NVIDIA GPU,
and otherwise (CPU, KIMI_MLX_MLA=reference, shapes the kernels don't take) the blockwise MLX-ops
functions below, which are also the reference the kernels are tested against. Scores are built
for one (query block x key block) tile at a time, so peak memory grows linearly with context
and never holds a queries x keys x heads tensor.
"""
from __future__ import annotations

import mlx.core as mx

from ..cache import segment_rows

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


_LOG2E = 1.4426950408889634


def _base2() -> bool:
    """Softmax in base 2 on the CPU: MLX's CPU exp costs ~12 ns an element, 2**x about a third of
    that (the scores are pre-scaled by log2(e), so the weights are the same up to rounding)."""
    return mx.default_device().type == mx.DeviceType.cpu


def _exp2(x):
    return mx.power(2.0, x)


def _softmax_exp(scale: float):
    """(exp, scale) for the online softmax: base 2 with the scale times log2(e) on the CPU."""
    return (_exp2, scale * _LOG2E) if _base2() else (mx.exp, scale)


def _online_softmax(m, l, acc, s, pv, exp=mx.exp):
    """One key tile of the online softmax: running max m, normaliser l, output acc (all fp32).
    exp: mx.exp, or _exp2 when the scores were scaled by log2(e)."""
    s_max = s.max(axis=-1, keepdims=True)
    if m is None:
        p = exp(s - s_max)
        return s_max, p.sum(axis=-1, keepdims=True), pv(p)
    m_new = mx.maximum(m, s_max)
    corr = exp(m - m_new)
    p = exp(s - m_new)
    return m_new, l * corr + p.sum(axis=-1, keepdims=True), acc * corr + pv(p)


def latent_attention(
    q: mx.array,
    blocks: list[mx.array],
    d_v: int,
    scale: float,
    q_offset: int,
    block_k: int | None = None,
    tile_elems: int = TILE_ELEMS,
) -> mx.array:
    """q: [B, H, T, D]; blocks: rows [B, n_i, D] in token order (values = rows[..., :d_v]).

    Query t sits at absolute position q_offset + t and sees keys 0..q_offset + t.
    Returns [B, H, T, d_v] in q's dtype. block_k: keys per score tile; by default as many as
    one tile of tile_elems holds (decode: the whole cache in one softmax, no per-block launches).
    """
    B, H, T, D = q.shape
    widen = _widen(q)
    exp, scale = _softmax_exp(scale)
    if block_k is None:
        block_k = max(1024, tile_elems // max(1, B * H * T))
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
        several = len(visible) > 2
        for ks, kb in visible:
            if widen and kb.dtype != mx.float32:
                kb = kb.astype(mx.float32)
            kn = kb.shape[1]
            s = (qflat @ kb.transpose(0, 2, 1)).reshape(B, H, tq, kn).astype(mx.float32) * scale
            s = _causal(s, first_q, ks)
            def pv(p, kb=kb):
                # heads folded into rows: one matmul (a head-broadcast one is ~30x slower on the CPU);
                # against whole rows, then the value columns kept: the strided [:, :, :d_v] operand
                # would be copied first (3x slower on the CPU at the real widths)
                o = p.astype(kb.dtype).reshape(B, H * tq, kn) @ kb
                return o[..., :d_v].reshape(B, H, tq, d_v).astype(mx.float32)

            m, l, acc = _online_softmax(m, l, acc, s, pv, exp)
            # keep at most one large score tile alive on long contexts; a small one (a decode step's
            # short tail segment) is not worth a synchronous evaluation in the middle of the step
            if several and B * H * tq * kn >= (1 << 20):
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
    exp, scale = _softmax_exp(scale)
    bq = max(1, min(T, tile_elems // max(1, B * H * block_k)))
    qblocks = [(q_offset + qs, q[:, :, qs:qs + bq]) for qs in range(0, T, bq)]
    state = [(None, None, None)] * len(qblocks)
    keys = [(ks, kb) for ks, kb in _key_blocks(blocks, block_k) if ks <= q_offset + T - 1]
    big = len(keys) > 2 and B * H * T * block_k >= (1 << 20)
    for ks, kb in keys:
        k, v = expand(kb.astype(mx.float32) if widen and kb.dtype != mx.float32 else kb)
        kt = k.astype(q.dtype).transpose(0, 1, 3, 2)  # once per key block, for every query block
        v = mx.contiguous(v)  # a column slice of kv_b's output: copied once here, not in every matmul
        for i, (first_q, qb) in enumerate(qblocks):
            if ks > first_q + qb.shape[2] - 1:
                continue  # every key of this block is in these queries' future
            s = _causal((qb @ kt).astype(mx.float32) * scale, first_q, ks)
            state[i] = _online_softmax(*state[i], s, lambda p: (p.astype(v.dtype) @ v).astype(mx.float32),
                                       exp)
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


# -- dispatch: kernels where they run, the forms above elsewhere -------------------------------

# keys expanded at a time in the kernel prefill path (per-head k_nope | v of every key: ~16 KB
# a key at the real widths, so 16K keys ~ 256 MB)
EXPAND_BLOCK_BYTES = 256 << 20
EXPAND_MIN_KEYS = 1024


def expand_min_queries() -> int:
    """Chunks of at least this many queries take the expanded form. With the kernels the
    absorbed one is a decode kernel whose every 32 query rows read the whole cache, so only
    short chunks stay absorbed; the MLX-ops forms break even near 256 on the CPU."""
    from metal_kernels import mla as K

    return 32 if K.backend() is not None else 256


def _segments(source) -> list[tuple]:
    """(data, n, start, D) per segment of an MLACache, or of a list of row blocks."""
    if isinstance(source, (list, tuple)):
        out, pos = [], 0
        for blk in source:
            out.append((blk, blk.shape[1], pos, blk.shape[-1]))
            pos += blk.shape[1]
        return out
    return [(s["data"], s["n"], s["start"], s["D"]) for s in source.segments()]


def _blocks(source) -> list[mx.array]:
    return list(source) if isinstance(source, (list, tuple)) else source.blocks()


def _cached(source) -> int:
    return sum(b.shape[1] for b in source) if isinstance(source, (list, tuple)) else source.offset


_TRUSTED: dict = {}


def _kernels_trusted(kind: str, key: tuple) -> bool:
    """On Metal, where these kernels have not yet run on Apple hardware, each template instance
    is checked once per process against the plain path on a small input before it is used; a
    compile error or a wrong result keeps the plain path, with a warning. (The CUDA twin is
    checked on the device by scripts/mla_device_check.py.)"""
    from metal_kernels import mla as K

    if K.backend() != "metal":
        return True
    if key not in _TRUSTED:
        _TRUSTED[key] = True  # the check below runs the kernels themselves
        try:
            err, tol = _SELF_CHECKS[kind](*key)
            why = None if err <= tol else f"differs from the plain path by {err:.2e} (> {tol:.0e})"
        except Exception as e:  # noqa: BLE001 - any failure means: don't use it
            why = f"failed: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
        _TRUSTED[key] = why is None
        if why:
            import warnings

            warnings.warn(f"MLA {kind} kernel {key} {why}; using the MLX-ops path", RuntimeWarning, stacklevel=3)
    return _TRUSTED[key]


def _check_tol(dtype) -> float:
    return 1e-4 if dtype == mx.float32 else 5e-2


def _self_check_decode(dtype, D, d_v, bits, group_size):
    from ..cache import MLACache

    rng = mx.random.key(7)
    k1, k2 = mx.random.split(rng)
    rows = mx.random.normal((1, 70, D), key=k1).astype(dtype)
    c = MLACache(bits=bits, group_size=group_size)
    c.append(rows)
    q = (mx.random.normal((1, 2, 1, D), key=k2) * D ** -0.5).astype(dtype)
    out = mla_decode_attention(q, c, 0.5, d_v)
    ref = latent_attention_reference(q, mx.concatenate(c.blocks(), axis=1), d_v, 0.5, 69)
    return float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max()), _check_tol(dtype)


def _self_check_prefill(dtype, DK, d_rope, d_v, D):
    nope = DK - d_rope
    k1, k2, k3 = mx.random.split(mx.random.key(8), 3)
    rows = mx.random.normal((1, 40, D), key=k1).astype(dtype)
    kv = mx.random.normal((1, 40, 1, nope + d_v), key=k2).astype(dtype)
    q = (mx.random.normal((1, 40, 1, DK), key=k3) * DK ** -0.5).astype(dtype)

    def expand(r):
        k = mx.concatenate([kv[..., :nope], r[:, :, None, D - d_rope:].astype(dtype)], axis=-1)
        return k.transpose(0, 2, 1, 3), kv[..., nope:].transpose(0, 2, 1, 3)

    out = mla_prefill_attention(q, [rows], lambda r: kv, 0.5, d_rope, d_v, 0, expand=expand)
    ref = expanded_attention(q.transpose(0, 2, 1, 3), [rows], expand, 0.5, 0).transpose(0, 2, 1, 3)
    return float(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32)).max()), _check_tol(dtype)


_SELF_CHECKS = {"decode": _self_check_decode, "prefill": _self_check_prefill}


def _seg_key(data, D):
    if isinstance(data, dict):
        return data["scales"].dtype, D, 8, (data["wq"].shape[2] * 4) // data["scales"].shape[2]
    return data.dtype, D, None, 64


def mla_decode_attention(q: mx.array, source, scale: float, d_v: int, q_offset: int | None = None) -> mx.array:
    """Absorbed MLA attention. q [B, H, T, D] (W_uk^T q_nope | q_pe); source: an MLACache that
    already holds these tokens, or a list of row blocks [B, n, D]. Query t is at absolute
    position q_offset + t (default: the last T positions cached). Returns [B, H, T, d_v]."""
    B, H, T, D = q.shape
    q_offset = _cached(source) - T if q_offset is None else q_offset
    segs = _segments(source)
    plan = decode_kernel_plan(q.shape, [(d, n, start) for d, n, start, _ in segs], q_offset, d_v)
    if plan is not None:
        launches, infos = plan
        return decode_kernel_attention(q, [d for d, *_ in segs], [decode_info(*i) for i in infos], launches, scale)
    return latent_attention(q, _blocks(source), d_v, scale, q_offset)


INFO_INTS = 5  # a decode launch's info array: n, key_start, q_offset, heads, keys per split


def decode_kernel_plan(q_shape, segs, q_offset: int, d_v: int):
    """The host side of the decode kernels for q of q_shape [B, H, T, D] over segs [(data, n,
    start)]: (launches, infos), one of each a segment, infos the ints of each launch's info array;
    or None when the kernels don't take this (the plain path runs). Depends on the depth only
    through the split counts in the launches and the values in the infos."""
    from metal_kernels import mla as K

    B, H, T, D = q_shape
    if not segs or K.backend() is None or not all(
            _kernels_trusted("decode", (k[0], D, d_v, k[2], k[3])) for k in (_seg_key(d, D) for d, *_ in segs)):
        return None
    per_seg = K.MAX_SPLITS // len(segs)  # one combine takes every segment's splits
    if not per_seg:
        return None
    launches, infos = [], []
    for data, n, start in segs:
        plan = K.mla_decode_launch(data, B, T * H, D, d_v, n, per_seg)
        if plan is None:
            return None
        launches.append(plan[0])
        infos.append((n, start, q_offset, H, plan[1]))
    if not K.combine_fits(sum(launch.ns for launch in launches), d_v):
        return None
    return tuple(launches), infos


def decode_info(*vals) -> mx.array:
    """The int32 info array of decode kernel launches: the same values give the same array, so a
    step's MLA layers share one, and successive steps read rows of one GPU-resident table
    (metal_kernels.StepInfo)."""
    from metal_kernels import step_info

    return step_info(*vals)


def decode_kernel_attention(q: mx.array, datas, infos, launches, scale: float) -> mx.array:
    """The decode kernels of a decode_kernel_plan: q [B, H, T, D] over the segments' data, info
    arrays per segment -> [B, H, T, d_v]. Arrays only besides the plan: it runs inside mx.compile."""
    from metal_kernels import mla as K

    B, H, T, D = q.shape
    qr = q.transpose(0, 2, 1, 3).reshape(B, T * H, D)
    parts = [K.mla_decode_run(launch, qr, data, info, scale) for launch, data, info in zip(launches, datas, infos)]
    o = K.mla_combine(parts, q.dtype)
    return o.reshape(B, T, H, -1).transpose(0, 2, 1, 3)


def mla_prefill_attention(q: mx.array, source, expand_kv, scale: float, d_rope: int, d_v: int,
                          q_offset: int | None = None, expand=None) -> mx.array:
    """Expanded MLA attention for a chunk of queries. q [B, T, H, NOPE + DR] (as q_proj gives
    it); source as in mla_decode_attention; expand_kv(rows [B, n, D]) -> kv [B, n, H, NOPE + DV]
    (kv_b_proj of the latents); expand(rows) -> (k [B, H, n, DK], v [B, H, n, DV]) for the plain
    path. Returns [B, T, H, DV] in q's dtype. The kernel path expands the cache block by block
    (EXPAND_BLOCK_BYTES), each block continuing the previous block's (o, lse)."""
    from metal_kernels import mla as K

    B, T, H, DK = q.shape
    q_offset = _cached(source) - T if q_offset is None else q_offset
    segs = _segments(source)
    if segs and K.backend() is not None and _kernels_trusted("prefill", (q.dtype, DK, d_rope, d_v, segs[0][3])):
        per_key = B * H * (DK - d_rope + d_v) * q.dtype.size
        blk = max(EXPAND_MIN_KEYS, EXPAND_BLOCK_BYTES // max(1, per_key))
        state = None
        for data, n, start, D in segs:
            for s in range(0, min(n, q_offset + T - start), blk):  # keys past the chunk: nobody sees them
                e = min(n, s + blk)
                rows = segment_rows(data, s, e, D)
                state = K.mla_prefill_block(q, expand_kv(rows), rows, e - s, start + s, q_offset, scale,
                                            d_v, d_rope, init=state)
                if state is None:
                    break
                if n > blk or len(segs) > 1:  # one expanded block alive at a time, not all of them
                    mx.eval(state)
            if state is None:
                break
        if state is not None:
            return state[0].astype(q.dtype)
    if expand is None:
        raise ValueError("mla_prefill_attention: the plain path needs expand")
    o = expanded_attention(q.transpose(0, 2, 1, 3), _blocks(source), expand, scale, q_offset)
    return o.transpose(0, 2, 1, 3)
