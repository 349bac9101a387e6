"""KDA dispatch used by the model layer.

    kda(q, k, v, g, beta, scale=None, initial_state=None) -> (o [B,T,H,V], state [B,H,K,V] fp32)

Order: KIMI_MLX_KDA=reference forces the per-token recurrence (debugging); otherwise a custom
kernel if `_kernel_impl()` provides one; otherwise `kda_step` for one token and the chunked
form for prompts. See kda_reference for shapes and the recurrence.
"""
from __future__ import annotations

import os

from .kda_chunked import kda_chunked
from .kda_reference import kda_recurrent, kda_step

__all__ = ["kda", "kda_chunked", "kda_recurrent", "kda_step"]

# Prompts up to this many tokens run the recurrence: cheaper than padding a whole chunk.
_RECURRENT_MAX_T = 6


def _kernel_impl():
    """Hook for the custom Metal/CUDA kernels (package `metal_kernels`).

    Return None, or a callable with kda's signature returning (o, state) for the current
    device. Returning None falls back to the MLX-ops paths below.
    """
    return None


def kda(q, k, v, g, beta, scale=None, initial_state=None):
    if os.environ.get("KIMI_MLX_KDA", "").lower() == "reference":
        return kda_recurrent(q, k, v, g, beta, scale, initial_state)
    impl = _kernel_impl()
    if impl is not None:
        return impl(q, k, v, g, beta, scale, initial_state)
    T = q.shape[1]
    if T == 1:
        return kda_step(q, k, v, g, beta, scale, initial_state)
    if T <= _RECURRENT_MAX_T:
        return kda_recurrent(q, k, v, g, beta, scale, initial_state)
    return kda_chunked(q, k, v, g, beta, scale, initial_state)
