"""Chunked KDA (WY/UT form with per-channel decay) in plain MLX ops: the prefill path.

Same interface as `kda_reference.kda_recurrent`. For a chunk of C tokens starting from state S:

  delta = T' (V - (K*Gamma) S),   T' = (I + diag(beta) A_kk)^-1 diag(beta)
  O     = (Q*Gamma) S + A_qk delta
  S    <- diag(Gamma_C) S + (K*tail)^T delta

with A_kk[i,j] = sum_c k_ic k_jc exp(gc_ic - gc_jc) for j < i, A_qk the same with q for j <= i,
gc the in-chunk cumulative log decay, Gamma = exp(gc) and tail_j = exp(gc_C - gc_j).

No exponent is ever positive. The decays come from one exp of the per-step gate and cumulative
products, every factor <= 1, so a product can only underflow where its true value is negligible.
exp(gc_i - gc_j) is split at a reference position between j and i, on two block levels:
across 16-token blocks (reference = start of i's block) and across 4-token blocks inside a
16-block (reference = start of i's 4-block); both levels are matmuls. Pairs inside one 4-block
are computed elementwise.

Everything except the state pass is batched over all chunks; the state pass is one compiled
step per chunk (three matmuls per head), and the outputs are two batched matmuls afterwards.
"""
from __future__ import annotations

import sys

import mlx.core as mx

# Tokens x batch x heads per segment: long prompts run in segments (state carried over). With
# 32 heads of 128 this keeps every intermediate <= 32 MB, which glibc serves from its heap
# instead of fresh mmaps: at 2K-4K tokens per segment page faults cost ~30% of the run.
_SEGMENT_ELEMS = 1024 * 32

_POW_EXP = sys.platform.startswith("linux")


def _exp(x):
    # On the Linux CPU build power() is ~2x faster than exp() and as accurate (~1 ulp).
    if _POW_EXP and mx.default_device().type == mx.DeviceType.cpu:
        return mx.power(2.0, x * 1.4426950408889634)
    return mx.exp(x)


def _intra(X, g, beta, NB):
    """All chunks of a segment at once.

    X: [B,H,N,NB,2,4,4,K] (q rows, k rows) fp32; g: same without the 2-axis; beta [B,H,N,C].
    Returns XG [B,H,N,2,C,K] (q*Gamma, k*Gamma), A_qk [B,H,N,C,C], T' [B,H,N,C,C],
    K*tail [B,H,N,C,K], Gamma_C [B,H,N,K].

    One algorithm step, kept whole (over 80 lines): its intermediates feed each other in the order
    of the derivation, and splitting them would pass a dozen arrays between functions.
    """
    B, H, N = X.shape[:3]
    K = X.shape[-1]
    C = 16 * NB
    f32 = mx.float32
    E = _exp(g)                                                   # per-step decay, [B,H,N,NB,4,4,K]
    c4 = mx.cumprod(E, axis=-2)                                   # prod_{r4 <= t <= i}
    b4 = mx.cumprod(E, axis=-2, reverse=True, inclusive=False)    # prod_{j < t <= e4}
    tot4 = mx.contiguous(c4[..., 3, :])                           # whole 4-blocks [B,H,N,NB,4,K]
    pre4 = mx.cumprod(tot4, axis=-2, inclusive=False)             # earlier 4-blocks of the 16-block
    post4 = mx.cumprod(tot4, axis=-2, reverse=True, inclusive=False)
    tot16 = pre4[..., 3, :] * tot4[..., 3, :]                     # whole 16-blocks [B,H,N,NB,K]
    pre16 = mx.cumprod(tot16, axis=-2, inclusive=False)
    post16 = mx.cumprod(tot16, axis=-2, reverse=True, inclusive=False)
    gam = pre16[..., -1, :] * tot16[..., -1, :]                   # whole chunk [B,H,N,K]

    kk = X[:, :, :, :, 1]
    LX4 = X * c4[:, :, :, :, None]                                # x_i prod_{r4 <= t <= i}
    G = (pre4 * pre16[..., None, :])[:, :, :, :, None, :, None, :]
    # Gamma-scaled rows, laid out [.., q|k, C, K] so the state pass reads contiguous k rows
    # (the multiply writes the transposed layout directly).
    perm = (0, 1, 2, 4, 3, 5, 6, 7)
    XG = (LX4.transpose(perm) * G.transpose(perm)).reshape(B, H, N, 2, C, K)
    Rb4 = kk * b4                                                 # k_j prod_{j < t <= e4}
    KT = (Rb4 * (post4 * post16[..., None, :])[..., None, :]).reshape(B, H, N, C, K)

    # Across 16-blocks: block row I against every earlier block J, reference = start of I.
    tops = []
    R = None
    for I in range(1, NB):
        nxt = (Rb4[:, :, :, I - 1] * post4[:, :, :, I - 1, :, None, :]).reshape(B, H, N, 16, K)
        # Rows of block J carry the decay of the whole blocks strictly between J and I.
        R = nxt if R is None else mx.concatenate([R * tot16[:, :, :, I - 1, None, :], nxt], axis=-2)
        left = (LX4[:, :, :, I] * pre4[:, :, :, I, None, :, None, :]).reshape(B, H, N, 32, K)
        tops.append((left @ R.swapaxes(-1, -2)).reshape(B, H, N, 2, 16, 16 * I))

    # Across 4-blocks inside each 16-block: right factors for 4-block rows 1, 2, 3.
    r0, r1, r2 = Rb4[..., 0, :, :], Rb4[..., 1, :, :], Rb4[..., 2, :, :]
    t1, t2 = tot4[..., 1, None, :], tot4[..., 2, None, :]
    r0t1 = r0 * t1
    Rm = mx.concatenate([r0, r0t1, r1, r0t1 * t2, r1 * t2, r2], axis=-2)   # [B,H,N,NB,24,K]
    mid = (LX4.reshape(B, H, N, NB, 32, K) @ Rm.swapaxes(-1, -2)).reshape(B, H, N, NB, 2, 4, 4, 24)

    # Inside 4-blocks, elementwise: exp(gc_i - gc_j) = prod_{j < t <= i} E_t.
    e1, e2 = E[..., 1:2, :], E[..., 2:3, :]                       # [B,H,N,NB,4,1,K]
    r10 = kk[..., 0:1, :] * e1
    r2x = mx.concatenate([r10 * e2, kk[..., 1:2, :] * e2], axis=-2)
    d1 = (X[..., 1:2, :] * r10[:, :, :, :, None]).sum(-1)                # [B,H,N,NB,2,4,1]
    d2 = (X[..., 2:3, :] * r2x[:, :, :, :, None]).sum(-1)                # [..,2,4,2]
    d3 = (X[..., 3:4, :] * Rb4[:, :, :, :, None, :, 0:3]).sum(-1)        # [..,2,4,3]
    dq = (X[:, :, :, :, 0] * kk).sum(-1)                                 # q_i . k_i [..,NB,4,4]

    # Assemble A_qk and A_kk as [B,H,N,2,C,C].
    def z(*s):
        return mx.zeros((B, H, N, NB, 2, 4) + s, dtype=f32)

    dx = mx.stack([dq, mx.zeros_like(dq)], axis=4)                # k rows have no diagonal
    D = mx.stack([
        mx.concatenate([dx[..., 0:1], z(3)], axis=-1),
        mx.concatenate([d1, dx[..., 1:2], z(2)], axis=-1),
        mx.concatenate([d2, dx[..., 2:3], z(1)], axis=-1),
        mx.concatenate([d3, dx[..., 3:4]], axis=-1),
    ], axis=-2)                                                   # [..,NB,2,4(I4),4(r),4(j)]
    DB = mx.concatenate([
        mx.concatenate([D[..., 0, :, :], z(12)], axis=-1),
        mx.concatenate([mid[..., 1, :, 0:4], D[..., 1, :, :], z(8)], axis=-1),
        mx.concatenate([mid[..., 2, :, 4:12], D[..., 2, :, :], z(4)], axis=-1),
        mx.concatenate([mid[..., 3, :, 12:24], D[..., 3, :, :]], axis=-1),
    ], axis=-2)                                                   # [..,NB,2,16,16]
    slabs = []
    for I in range(NB):
        parts = ([tops[I - 1]] if I else []) + [DB[:, :, :, I]]
        if I < NB - 1:
            parts.append(mx.zeros((B, H, N, 2, 16, C - 16 * (I + 1)), dtype=f32))
        slabs.append(mx.concatenate(parts, axis=-1))
    A = mx.concatenate(slabs, axis=-2)                            # [B,H,N,2,C,C]

    L = mx.eye(C, dtype=f32) + beta[..., None] * A[:, :, :, 1]
    Tm = mx.linalg.tri_inv(L, upper=False, stream=mx.cpu)
    return XG, A[:, :, :, 0], Tm * beta[..., None, :], KT, gam


def _chunk_step(S, kg, v, tb, kt, gam):
    """State pass for one chunk: S [B,H,K,V]; kg, kt [B,H,C,K]; v [B,H,C,V]; tb [B,H,C,C]."""
    delta = tb @ (v - kg @ S)
    S = gam[..., None] * S + kt.swapaxes(-1, -2) @ delta
    return delta, S


_chunk_step_c = mx.compile(_chunk_step)


def _segment(q, k, v, g, beta, S, C):
    """q, k, g [B, n*C, H, K]; v [B, n*C, H, V]; beta [B, n*C, H]. Returns o [B,n,C,H,V] fp32
    (q unscaled), final S."""
    B, Tn, H, K = q.shape
    V = v.shape[-1]
    N, NB = Tn // C, C // 16
    f32 = mx.float32

    def split(x):
        return x.reshape(B, N, NB, 4, 4, H, x.shape[-1]).transpose(0, 5, 1, 2, 3, 4, 6)

    X = mx.stack([split(q), split(k)], axis=4).astype(f32)        # the one transposing copy
    bt = mx.contiguous(beta.reshape(B, N, C, H).transpose(0, 3, 1, 2).astype(f32))
    XG, Aqk, Tb, KT, gam = _intra(X, split(g).astype(f32), bt, NB)
    vt = mx.contiguous(v.reshape(B, N, C, H, V).transpose(0, 3, 1, 2, 4).astype(f32))

    states, deltas = [], []
    for n in range(N):
        states.append(S)
        d, S = _chunk_step_c(S, XG[:, :, n, 1], vt[:, :, n], Tb[:, :, n], KT[:, :, n], gam[:, :, n])
        deltas.append(d)
    S_all = mx.stack(states, axis=2)                              # chunk-start states [B,H,N,K,V]
    o = XG[:, :, :, 0] @ S_all + Aqk @ mx.stack(deltas, axis=2)   # [B,H,N,C,V]
    return o.transpose(0, 2, 3, 1, 4), S


def kda_chunked(q, k, v, g, beta, scale=None, initial_state=None, chunk_size=64):
    """Chunked KDA. Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32).

    q, k [B,T,H,K] (L2-normalised), v [B,T,H,V], g [B,T,H,K] log decay <= 0, beta [B,T,H],
    initial_state [B,H,K,V] or None. chunk_size must be a multiple of 16.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    if C <= 0 or C % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {C}")
    out_dtype = v.dtype
    if scale is None:
        scale = K ** -0.5
    f32 = mx.float32
    S = mx.zeros((B, H, K, V), dtype=f32) if initial_state is None else initial_state.astype(f32)
    if T == 0:
        return mx.zeros(v.shape, dtype=out_dtype), S
    C = min(C, 16 * -(-T // 16))                                  # short prompts: less padding
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # Padded tokens have k = 0 and g = 0: no decay and no update, so the state is exact.
        q, k, v, g = (mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v, g))
        beta = mx.pad(beta, [(0, 0), (0, pad), (0, 0)])

    seg = max(1, _SEGMENT_ELEMS // (B * H * C))                   # chunks per segment
    outs = []
    for n0 in range(0, N, seg):
        sl = slice(n0 * C, min(N, n0 + seg) * C)
        o, S = _segment(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], S, C)
        # q's scale is linear in o: applied here, fused with the layout copy and the cast.
        outs.append((o * scale).astype(out_dtype).reshape(B, -1, H, V))
        if n0 + seg < N:
            mx.eval(S, outs[-1])                                  # bound the lazy graph
    o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=1)
    if pad:
        o = o[:, :T]
    return o, S
