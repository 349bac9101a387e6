"""KDA dispatch: the one place that picks the implementation.

    kda(q, k, v, g, beta, scale=None, initial_state=None) -> (o [B,T,H,V], state [B,H,K,V] fp32)
        the operator on normalised q/k, log-space g and beta (MLX ops).
    kda_gated(q_raw, k_raw, v, f, b_raw, dt_bias, A_log, norm_weight, gate, eps, initial_state)
        -> (o [B,T,H,V] after the gated RMSNorm, state)
        everything a KDA layer does between its short convolutions and o_proj.
    kda_gated_conv(x, conv_state, conv_w, f_a, g_a, low_rank_w, b_raw, ...) -> (o, state, conv
        state) or None: one decode token, its short convolutions and the second low-rank
        projections of f and the gate in the kernel too.

Order: KIMI_MLX_KDA=reference forces the per-token recurrence (debugging); otherwise the custom
kernel (package `metal_kernels`: Metal on Apple GPUs, its CUDA twin on NVIDIA) when it takes
the shape; otherwise `kda_step` for one token; for more, on the CPU device our C kernel
(`kda_cpu`, built on first use; KIMI_MLX_KDA_CPU=off turns it off), else the recurrence up to
_RECURRENT_MAX_T tokens and the chunked MLX-ops form `kda_chunked` (the plain reference of the
chunked maths) beyond.
"""
from __future__ import annotations


import mlx.core as mx

from .kda_chunked import kda_chunked
from .kda_cpu import kda_cpu
from .kda_reference import kda_recurrent, kda_step

__all__ = ["kda", "kda_gated", "kda_gated_conv", "kda_gates", "kda_chunked", "kda_cpu", "kda_recurrent", "kda_step",
           "decay_gate", "l2norm", "kernel_backend"]

# Prompts up to this many tokens run the recurrence: cheaper than padding a whole chunk.
_RECURRENT_MAX_T = 6


def _forced_reference() -> bool:
    from ..settings import settings

    return settings().kda_reference


def _kernels():
    """The metal_kernels package, or None (it ships in the same wheel; a trimmed install still works)."""
    try:
        import metal_kernels
    except ImportError:
        return None
    return metal_kernels


def kernel_backend() -> str | None:
    """'metal', 'cuda', or None when the MLX-ops path runs (CPU, or KIMI_MLX_KDA=reference)."""
    mk = _kernels()
    return mk.backend() if mk is not None else None  # backend() honours KIMI_MLX_KDA itself


def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    # x / sqrt(sum x^2 + eps), as FLA and transformers do (not max(norm, eps))
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


def decay_gate(f: mx.array, dt_bias: mx.array, A_log: mx.array) -> mx.array:
    """g = -exp(A_log[h]) * softplus(f + dt_bias), per channel, fp32, log space.
    f [B, T, H, K]; dt_bias H*K values; A_log H values."""
    H, K = f.shape[-2:]
    x = f.astype(mx.float32) + dt_bias.astype(mx.float32).reshape(H, K)
    sp = mx.where(x > 20.0, x, mx.log1p(mx.exp(mx.minimum(x, 20.0))))
    return -mx.exp(A_log.astype(mx.float32)).reshape(H, 1) * sp


def kda_gates(q_raw, k_raw, f, b_raw, dt_bias, A_log):
    """(q, k, g, beta) in fp32 from the raw projections: what the kernels compute inside."""
    q = l2norm(q_raw.astype(mx.float32))
    k = l2norm(k_raw.astype(mx.float32))
    return q, k, decay_gate(f, dt_bias, A_log), mx.sigmoid(b_raw.astype(mx.float32))


def kda(q, k, v, g, beta, scale=None, initial_state=None):
    if _forced_reference():
        return kda_recurrent(q, k, v, g, beta, scale, initial_state)
    T = q.shape[1]
    if T == 1:
        # Decode stays in lazy MLX ops: a C call evaluates its inputs on the spot, and generation
        # queues token n+1's graph (async_eval) before reading token n, so a synchronous layer in
        # that graph would hold token n back a step.
        return kda_step(q, k, v, g, beta, scale, initial_state)
    if mx.default_device().type == mx.DeviceType.cpu:
        # the C kernel: faster than the MLX ops below at every T > 1 on the CPU
        r = kda_cpu(q, k, v, g, beta, scale, initial_state)
        if r is not None:  # None: switched off, or it can't be built here
            return r
    if T <= _RECURRENT_MAX_T:
        return kda_recurrent(q, k, v, g, beta, scale, initial_state)
    return kda_chunked(q, k, v, g, beta, scale, initial_state)


def gated_rms_norm(o, norm_weight, gate, eps):
    """RMSNorm(o) * weight * sigmoid(gate), in fp32."""
    o = mx.fast.rms_norm(o.astype(mx.float32), norm_weight.astype(mx.float32), eps)
    return o * mx.sigmoid(gate.astype(mx.float32))


def _kernel(q_raw, k_raw, v, f, b_raw, dt_bias, A_log, norm_weight, gate, eps, initial_state):
    """(o, state) from the custom kernel, or None when it does not take this call (the kernel
    entry points return None themselves off Metal/CUDA or under KIMI_MLX_KDA=reference)."""
    mk = _kernels()
    if mk is None:
        return None
    if q_raw.shape[1] == 1:  # the gated norm is fused
        return mk.kda_decode_step_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw,
                                        initial_state, norm_weight, gate, eps)
    r = mk.kda_prefill_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, initial_state)
    if r is None:
        return None
    o, state = r
    return gated_rms_norm(o, norm_weight, gate, eps), state


def kda_gated_conv(x, conv_state, conv_w, f_a, g_a, low_rank_w, b_raw, dt_bias, A_log, norm_weight, eps,
                   initial_state):
    """One decode token with its short convs and the second low-rank projections in the kernel
    too: x [B, 1, C] the token's projections before the convs ([q | k | v]), conv_state
    [B, KC-1, C], conv_w [C, KC]; f_a, g_a [B, 1, K] the first projections of f and the gate,
    low_rank_w = (f_b weight [H*K, K], g_b weight [H*V, K]). Returns (o [B, 1, H, V], state,
    new conv state), or None where no kernel takes it (the caller runs the MLX ops and kda_gated)."""
    mk = _kernels()
    if mk is None or _forced_reference() or initial_state is None:
        return None
    return mk.kda_decode_step_fused(x, None, None, f_a, dt_bias, A_log, b_raw, initial_state, norm_weight,
                                    g_a, eps, conv=(conv_state, conv_w), low_rank=low_rank_w)


def kda_gated(q_raw, k_raw, v, f, b_raw, dt_bias, A_log, norm_weight, gate, eps,
              initial_state=None):
    """q_raw, k_raw, f, gate [B,T,H,K]; v [B,T,H,V]; b_raw [B,T,H] — raw projections (after
    the short convs, before L2 norm / softplus / sigmoid). Returns (o fp32, state fp32)."""
    r = _kernel(q_raw, k_raw, v, f, b_raw, dt_bias, A_log, norm_weight, gate, eps, initial_state)
    if r is not None:
        return r
    q, k, g, beta = kda_gates(q_raw, k_raw, f, b_raw, dt_bias, A_log)
    o, state = kda(q, k, v, g, beta, initial_state=initial_state)
    return gated_rms_norm(o, norm_weight, gate, eps), state
