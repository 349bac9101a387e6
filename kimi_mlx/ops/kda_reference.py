"""Kimi Delta Attention (KDA) as a plain per-token recurrence: the reference form.

Shapes (H heads, K key dim, V value dim):
  q, k  [B, T, H, K]  already L2-normalised; q is multiplied by ``scale`` here
  v     [B, T, H, V]
  g     [B, T, H, K]  per-channel log decay (<= 0)
  beta  [B, T, H]
  state [B, H, K, V]  fp32

Per head and token: S <- diag(exp(g_t)) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = S^T q_t.
All maths in fp32; o is returned in v's dtype, the state in fp32.
"""
from __future__ import annotations

import mlx.core as mx


def _step(q, k, v, e, beta, S):
    """One token for all heads. q, k, e [B, H, K]; v [B, H, V]; beta [B, H]; S [B, H, K, V].

    The decayed state is never materialised: (e*S)^T k == S^T (e*k), so one matmul reads S
    for both the read-out and the delta term, and one fused pass writes the new state.
    """
    qe = q * e
    ke = k * e
    both = mx.stack([qe, ke], axis=-2) @ S                 # [B, H, 2, V]
    delta = beta[..., None] * (v - both[..., 1, :])        # [B, H, V]
    qk = (q * k).sum(-1, keepdims=True)                    # [B, H, 1]
    o = both[..., 0, :] + qk * delta                       # q^T (e*S + k delta^T)
    S = e[..., None] * S + k[..., None] * delta[..., None, :]
    return o, S


_step_compiled = mx.compile(_step)


def _prepare(q, k, v, g, beta, scale, initial_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    f32 = mx.float32
    q = q.astype(f32) * scale
    k, v, g, beta = (x.astype(f32) for x in (k, v, g, beta))
    if initial_state is None:
        S = mx.zeros((B, H, K, V), dtype=f32)
    else:
        S = initial_state.astype(f32)
    return q, k, v, g, beta, S


@mx.compile
def _decode(q, k, v, g, beta, S, scale):
    f32 = mx.float32
    o, S = _step(q[:, 0].astype(f32) * scale, k[:, 0].astype(f32), v[:, 0].astype(f32),
                 mx.exp(g[:, 0].astype(f32)), beta[:, 0].astype(f32), S)
    return o[:, None].astype(v.dtype), S


def kda_step(q, k, v, g, beta, scale=None, initial_state=None):
    """Single-token KDA (T == 1), the decode path. Same interface as kda_recurrent."""
    B, T, H, K = q.shape
    if T != 1:
        raise ValueError(f"kda_step takes one token, got T={T}")
    if initial_state is None:
        S = mx.zeros((B, H, K, v.shape[-1]), dtype=mx.float32)
    else:
        S = initial_state.astype(mx.float32)
    scale = K ** -0.5 if scale is None else scale
    # One compiled graph: casts, scale, exp and the step fuse (scale enters as an array so a
    # new value does not recompile).
    return _decode(q, k, v, g, beta, S, mx.array(scale, dtype=mx.float32))


def kda_recurrent(q, k, v, g, beta, scale=None, initial_state=None):
    """Token-by-token KDA. Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32)."""
    out_dtype = v.dtype
    T = q.shape[1]
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, scale, initial_state)
    e = mx.exp(g)
    outs = []
    for t in range(T):
        o, S = _step_compiled(q[:, t], k[:, t], v[:, t], e[:, t], beta[:, t], S)
        outs.append(o)
    if not outs:
        return mx.zeros(v.shape, dtype=out_dtype), S
    return mx.stack(outs, axis=1).astype(out_dtype), S
