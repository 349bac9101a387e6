"""Launch code of the MoE routing kernel (moe_template.py).

    moe_route(logits, bias, top_k, renormalize, scaling, shared=False, dup=False, weight_dtype=fp32)
        -> (inds [..., k] uint32, weights [..., k] weight_dtype)

scores = sigmoid(logits), choice = scores + bias; the k experts of largest choice (ties: the lower
expert first), weighted by their scores, renormalised when asked, times scaling: what
kimi_mlx.model.moe.route computes without group limiting. The picks come in descending choice
(mx.argpartition's order is arbitrary, so callers must not rely on either). shared: one more pick,
expert E (a shared expert stacked after the routed ones) with weight 1 (k + 1 columns); dup: inds
holds each row's picks, then the same plus E + shared (gate and up halves stacked in one array),
so 2 (k + shared) columns.

Returns None when there is no kernel for the call: the CPU, KIMI_MLX_MOE_ROUTE=reference (or
KIMI_MLX_KDA=reference, which turns every kernel off), logits other than fp32, more than 1024
experts, k above 32 or above the experts. The caller then runs the MLX ops.
"""
from __future__ import annotations

import math

from kimi_mlx.settings import kernel_switch

from . import info_floats
from .moe_template import MAX_EXPERTS, MAX_TOP_K, threads


def backend() -> str | None:
    """'metal', 'cuda', or None: KIMI_MLX_MOE_ROUTE=reference forces the MLX-ops routing."""
    if kernel_switch("KIMI_MLX_MOE_ROUTE") == "reference":
        return None
    from . import backend as _be

    return _be()


def _kernel(be):
    from . import _kernel as k  # looked up per call: tests swap in the emulator

    return k(be, "moe_route")


def moe_route(logits, bias, top_k: int, renormalize: bool, scaling: float, shared: bool = False,
              dup: bool = False, weight_dtype=None):
    be = backend()
    if be is None:
        return None
    import mlx.core as mx

    E = logits.shape[-1]
    lead = logits.shape[:-1]
    N = math.prod(lead)
    ko = top_k + bool(shared)
    if (logits.dtype != mx.float32 or E > MAX_EXPERTS or not 1 <= top_k <= min(E, MAX_TOP_K)
            or ko > MAX_TOP_K or bias.size != E or N == 0):
        return None
    if bias.dtype != mx.float32:
        bias = bias.astype(mx.float32)
    nt = threads(E)
    # the kernel reads and writes rows flat (inputs come row contiguous): no reshapes to launch
    wt = mx.float32 if weight_dtype is None else weight_dtype
    inds, weights = _kernel(be)(
        inputs=[logits, bias, info_floats(float(scaling))],
        template=[("E", E), ("K", top_k), ("NT", nt), ("RENORM", bool(renormalize)), ("WT", wt),
                  ("SH", int(bool(shared))), ("DUP", bool(dup))],
        grid=(nt * N, 1, 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(*lead, ko * (2 if dup else 1)), (*lead, ko)],
        output_dtypes=[mx.uint32, wt],
        init_value=None,
    )
    return inds, weights
