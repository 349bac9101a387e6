"""Sigmoid-routed MoE: biased selection, unbiased renormalised weights, shared expert."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from .switch import SwitchGLU, stacked_experts

from ..config import ModelConfig
from ..ops.cpu_fast import is_plain_linear
from ..settings import kernel_switch
from .common import MLP, Linear, derived, matmul_t, one_token, transposed


def _on_gpu() -> bool:
    """The routing kernel runs where the default device is a GPU: there its launch is one primitive
    that mx.compile traces (decode steps route inside compiled pieces); the CPU tests' emulator
    reads its inputs on the host."""
    return mx.default_device().type == mx.DeviceType.gpu


def _route_kernel(logits, bias, top_k, renormalize, scaling, **stacked):
    """metal_kernels' one-launch routing, or None (no kernel here: route_reference runs)."""
    if not _on_gpu():
        return None
    try:
        from metal_kernels.moe import moe_route
    except ImportError:  # a trimmed install without the kernels
        return None
    return moe_route(logits, bias, top_k, renormalize, scaling, **stacked)


def route(logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
          renormalize: bool, scaling: float):
    """logits fp32 [..., E] -> (indices [..., k], weights fp32 [..., k]), the k picks in no set
    order. Without group limiting one kernel does it all on a GPU; with it, on the CPU, or with
    KIMI_MLX_MOE_ROUTE=reference the MLX ops of route_reference run."""
    if n_group <= 1 or topk_group >= n_group:
        out = _route_kernel(logits, bias, top_k, renormalize, scaling)
        if out is not None:
            return out
    return route_reference(logits, bias, top_k, n_group, topk_group, renormalize, scaling)


def route_stacked(logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
                  renormalize: bool, scaling: float, dtype):
    """route for switch.StackedExperts (a decode token): (gate|up indices [..., 2 (k + 1)], down
    indices [..., k + 1], weights [..., k + 1] in dtype), the shared expert (index E, weight 1)
    after the k picks, and the up halves E + 1 after the gate halves."""
    E = logits.shape[-1]
    if n_group <= 1 or topk_group >= n_group:
        out = _route_kernel(logits, bias, top_k, renormalize, scaling, shared=True, dup=True, weight_dtype=dtype)
        if out is not None:
            gate_up, weights = out
            return gate_up, gate_up[..., : top_k + 1], weights
    inds, weights = route_reference(logits, bias, top_k, n_group, topk_group, renormalize, scaling)
    inds = mx.concatenate([inds.astype(mx.uint32), mx.full((*inds.shape[:-1], 1), E, mx.uint32)], axis=-1)
    weights = mx.concatenate([weights, mx.ones((*weights.shape[:-1], 1), weights.dtype)], axis=-1)
    return mx.concatenate([inds, inds + (E + 1)], axis=-1), inds, weights.astype(dtype)


def route_reference(logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
                    renormalize: bool, scaling: float):
    """route in MLX ops, on every device."""
    scores = mx.sigmoid(logits)
    choice = scores + bias.astype(mx.float32)  # bias picks experts, never weights them
    if n_group > 1:
        E = choice.shape[-1]
        grouped = choice.reshape(*choice.shape[:-1], n_group, E // n_group)
        group_score = mx.topk(grouped, 2, axis=-1).sum(axis=-1)  # [..., n_group]
        drop = mx.argpartition(group_score, kth=n_group - topk_group - 1, axis=-1)[..., : n_group - topk_group] \
            if topk_group < n_group else None
        if drop is not None:
            keep = mx.ones(group_score.shape, dtype=mx.bool_)
            keep = mx.put_along_axis(keep, drop, mx.array(False), axis=-1)
            grouped = mx.where(keep[..., None], grouped, -mx.inf)
        choice = grouped.reshape(choice.shape)
    inds = mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, inds, axis=-1)
    if renormalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return inds, weights * scaling


class KimiMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.num_experts
        self.gate = Linear(cfg.hidden_size, E, bias=False)
        self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, E)
        if cfg.num_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.cfg
        if is_plain_linear(self.gate) and "bias" not in self.gate:
            # fp32 logits from an fp32 copy of the router, made once: a bf16 weight would be
            # converted again every token (a launch and 3.5 MB of traffic a MoE layer)
            w = self.gate.weight
            logits = matmul_t(x.astype(mx.float32), derived(self, "_gate_fp32", (w,),
                                                            lambda: transposed(w.astype(mx.float32))))
        else:
            gx = x if isinstance(self.gate, nn.QuantizedLinear) else x.astype(mx.float32)
            logits = self.gate(gx).astype(mx.float32)
        args = (self.e_score_correction_bias, c.num_experts_per_token, c.num_expert_group, c.topk_group,
                c.moe_renormalize, c.routed_scaling_factor)
        stacked = stacked_experts(self, self.switch_mlp, self.shared_experts) \
            if one_token(x) and "shared_experts" in self and kernel_switch("KIMI_MLX_MOE_STACK", "on") != "off" else None
        if stacked is not None:  # the k picks and the shared expert: two gathered matmuls and one sum
            gate_up, inds, weights = route_stacked(logits, *args, x.dtype)
            y = stacked(x, gate_up, inds)  # [..., k + 1, d]
            return (weights[..., None, :].astype(y.dtype) @ y).squeeze(-2).astype(x.dtype)
        inds, weights = route(logits, *args)
        y = self.switch_mlp(x, inds)  # [..., k, d]
        if one_token(x):  # the weighted sum over the k experts as one matmul, not two kernels
            y = (weights[..., None, :].astype(y.dtype) @ y).squeeze(-2).astype(x.dtype)
        else:
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2).astype(x.dtype)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
