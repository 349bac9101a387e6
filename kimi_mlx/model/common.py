"""Small pieces shared by the layers."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class MLP(nn.Module):
    """SwiGLU MLP (dense layers and the shared expert)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def linear_weight(layer: nn.Module) -> mx.array:
    """The dense weight of a Linear or QuantizedLinear (dequantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight
