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


def derived(module: nn.Module, name: str, sources: tuple, make, *extra):
    """make(), computed from some of module's arrays (`sources`) once, and again only when one of
    them is replaced (load_weights) or `extra` changes. Kept in the instance __dict__, so nn.Module
    doesn't take it for a parameter (name must not be a method or attribute of the module: it would
    shadow it); the sources are held so that no new array reuses their ids."""
    key = (*map(id, sources), *extra)
    hit = module.__dict__.get(name)
    if hit is None or hit[0] != key:
        hit = (key, make(), sources)
        module.__dict__[name] = hit
    return hit[1]


def linear_weight(layer: nn.Module) -> mx.array:
    """The dense weight of a Linear or QuantizedLinear (dequantized)."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight
