"""Expert layers: all experts' weights stacked [E, out, in], applied with gathered matmuls.

Same parameter layout as mlx-lm's switch layers (so mlx-lm conversions load as is), but
our own small module: importing mlx_lm pulls in transformers (seconds of start-up).
"""
from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from ..ops.cpu_fast import is_plain_linear
from .common import LINEAR_KEYS, MLP, derived, forget_derived, held_arrays, linear_form


def _sort_by_expert(x, indices):
    """Group token copies by expert so each expert's rows are contiguous (fast gathered matmul)."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    return x.flatten(0, -3)[order // k], flat[order], inv


@functools.lru_cache(maxsize=32)
def _lhs_rows(shape: tuple) -> mx.array:
    """The lhs indices gather_mm builds itself when given none (an arange over x's batch), made
    once a shape: one kernel less a gathered matmul in a decode step."""
    a = mx.arange(math.prod(shape), dtype=mx.uint32).reshape(shape)
    mx.eval(a)  # a constant, also when first made inside a compiled trace or on another thread
    return a


class SwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x, indices, sorted_indices=False, lhs=None):
        w = self.weight  # [E, in, out] as a view made once (a graph node less a call; see transposed)
        wt = derived(self, "_weight_t", (w,), lambda: w.swapaxes(-1, -2))
        return mx.gather_mm(x, wt, lhs_indices=lhs, rhs_indices=indices,
                            sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kwargs):
        return QuantizedSwitchLinear.from_weight(self.weight, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims: int, output_dims: int, num_experts: int, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self._set(mx.zeros((num_experts, output_dims, input_dims)))
        self.freeze()

    def _set(self, w):
        self.weight, self.scales, *b = mx.quantize(w, self.group_size, self.bits, mode=self.mode)
        self.biases = b[0] if b else None

    @classmethod
    def from_weight(cls, w, group_size, bits, mode="affine"):
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.group_size, q.bits, q.mode = group_size, bits, mode
        q._set(w)
        q.freeze()
        return q

    def __call__(self, x, indices, sorted_indices=False, lhs=None):
        return mx.gather_qmm(x, self.weight, self.scales, self.get("biases"), lhs_indices=lhs, rhs_indices=indices,
                             transpose=True, group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)


class SwitchGLU(nn.Module):
    """SwiGLU experts: x [..., d], indices [..., k] -> [..., k, d]."""

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts)

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64
        idx, inv, lhs_x, lhs_h = indices, None, None, None
        if do_sort:
            x, idx, inv = _sort_by_expert(x, indices)
        else:  # a few tokens (a decode step): constant lhs indices (the sorted prefill path keeps its own)
            lhs_x, lhs_h = _lhs_rows(x.shape[:-2]), _lhs_rows(indices.shape)
        h = nn.silu(self.gate_proj(x, idx, do_sort, lhs_x)) * self.up_proj(x, idx, do_sort, lhs_x)
        y = self.down_proj(h, idx, do_sort, lhs_h)
        if do_sort:
            y = mx.unflatten(y[inv], 0, indices.shape)
        return y.squeeze(-2)


def _stackable(glu, shared) -> bool:
    """The routed experts (a SwitchGLU as it is, not the CPU fast path's) and the shared expert
    (an MLP as wide as one expert) have one form: plain (no bias) or quantized alike."""
    if type(glu) is not SwitchGLU or type(shared) is not MLP:
        return False
    routed = (glu.gate_proj, glu.up_proj, glu.down_proj)
    own = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if all(type(m) is SwitchLinear for m in routed):
        if not all(is_plain_linear(m) and "bias" not in m for m in own):
            return False
    elif not (all(type(m) is QuantizedSwitchLinear for m in routed) and all(type(m) is nn.QuantizedLinear for m in own)):
        return False
    if len({linear_form(m) for m in routed + own}) != 1:
        return False
    return all(m.get(k) is None or m[k].shape[1:] == o[k].shape for m, o in zip(routed, own) for k in LINEAR_KEYS)


class StackedExperts:
    """A MoE layer's routed experts and its shared expert as two stacked arrays: the gate and up
    halves [gate of E + 1 | up of E + 1] and the down projections [E + 1], the shared expert at
    index E. A decode token's k picks and the shared expert then run as two gathered matmuls (with
    the indices moe.route_stacked gives), not two gathered and three plain matmuls."""

    def __init__(self, gate_up: nn.Module, down: nn.Module):
        self.gate_up, self.down = gate_up, down

    def __call__(self, x: mx.array, gate_up_inds: mx.array, inds: mx.array) -> mx.array:
        """x [..., d], gate_up_inds [..., 2k], inds [..., k] -> [..., k, d]."""
        x = mx.expand_dims(x, (-2, -3))
        h = self.gate_up(x, gate_up_inds, False, _lhs_rows(x.shape[:-2]))  # [..., 2k, 1, I]
        k = inds.shape[-1]
        h = nn.silu(h[..., :k, :, :]) * h[..., k:, :, :]
        return self.down(h, inds, False, _lhs_rows(inds.shape)).squeeze(-2)


def _stacked_layer(arrays: dict, like: nn.Module) -> nn.Module:
    """A SwitchLinear or QuantizedSwitchLinear (like `like`) over stacked arrays (no copy)."""
    m = type(like).__new__(type(like))
    nn.Module.__init__(m)
    if isinstance(like, QuantizedSwitchLinear):
        m.group_size, m.bits, m.mode = like.group_size, like.bits, like.mode
    for k, v in arrays.items():
        m[k] = v
    return m


def stacked_experts(owner: nn.Module, glu: nn.Module, shared: nn.Module) -> StackedExperts | None:
    """owner's StackedExperts, or None where the experts can't be stacked (_stackable). Made once,
    and again if one of their arrays is replaced (load_weights). The layers' own arrays become
    views of the stacked ones (contiguous blocks: prefill's gathered matmuls take them as they
    are), so nothing is stored twice and the layers still run (and save) alone."""
    layers = (glu.gate_proj, glu.up_proj, glu.down_proj, shared.gate_proj, shared.up_proj, shared.down_proj)
    hit = owner.__dict__.get("_stacked_experts")
    if hit is None or hit[0] != held_arrays(layers)[0]:
        value = _stack(glu, shared) if _stackable(glu, shared) else None
        key, arrays = held_arrays(layers)
        hit = owner.__dict__["_stacked_experts"] = (key, value, arrays)
    return hit[1]


def _stack(glu, shared) -> StackedExperts:
    g, u, d = glu.gate_proj, glu.up_proj, glu.down_proj
    sg, su, sd = shared.gate_proj, shared.up_proj, shared.down_proj
    E = g.weight.shape[0]
    keys = [k for k in LINEAR_KEYS if g.get(k) is not None]
    gate_up = {k: mx.concatenate([g[k], sg[k][None], u[k], su[k][None]]) for k in keys}
    down = {k: mx.concatenate([d[k], sd[k][None]]) for k in keys}
    mx.eval(gate_up, down)
    for k in keys:
        g[k], sg[k], u[k], su[k] = gate_up[k][:E], gate_up[k][E], gate_up[k][E + 1:2 * E + 1], gate_up[k][2 * E + 1]
        d[k], sd[k] = down[k][:E], down[k][E]
    # evaluated here: an unevaluated slice belongs to this thread's stream (see common._join)
    mx.eval([m[k] for m in (g, u, d, sg, su, sd) for k in keys])
    forget_derived(g, u, d, sg, su, sd, shared)
    return StackedExperts(_stacked_layer(gate_up, g), _stacked_layer(down, d))


from ..ops.cpu_fast import cpu_switch_glu  # noqa: E402  (ops know no model classes: we register ours)

CPUSwitchGLU = cpu_switch_glu(SwitchGLU)
