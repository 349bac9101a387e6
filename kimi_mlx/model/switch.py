"""Expert layers: all experts' weights stacked [E, out, in], applied with gathered matmuls.

Same parameter layout as mlx-lm's switch layers (so mlx-lm conversions load as is), but
our own small module: importing mlx_lm pulls in transformers (seconds of start-up).
"""
from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from .common import derived


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


from ..ops.cpu_fast import cpu_switch_glu  # noqa: E402  (ops know no model classes: we register ours)

CPUSwitchGLU = cpu_switch_glu(SwitchGLU)
