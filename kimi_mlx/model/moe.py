"""Sigmoid-routed MoE: biased selection, unbiased renormalised weights, shared expert."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from .switch import SwitchGLU

from ..config import ModelConfig
from .common import MLP, one_token


def route(logits: mx.array, bias: mx.array, top_k: int, n_group: int, topk_group: int,
          renormalize: bool, scaling: float):
    """logits fp32 [..., E] -> (indices [..., k], weights fp32 [..., k])."""
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
        self.gate = nn.Linear(cfg.hidden_size, E, bias=False)
        self.e_score_correction_bias = mx.zeros((E,), dtype=mx.float32)
        self.switch_mlp = SwitchGLU(cfg.hidden_size, cfg.moe_intermediate_size, E)
        if cfg.num_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.cfg
        gx = x if isinstance(self.gate, nn.QuantizedLinear) else x.astype(mx.float32)
        logits = self.gate(gx).astype(mx.float32)
        inds, weights = route(logits, self.e_score_correction_bias, c.num_experts_per_token,
                              c.num_expert_group, c.topk_group, c.moe_renormalize, c.routed_scaling_factor)
        y = self.switch_mlp(x, inds)  # [..., k, d]
        if one_token(x):  # the weighted sum over the k experts as one matmul, not two kernels
            y = (weights[..., None, :].astype(y.dtype) @ y).squeeze(-2).astype(x.dtype)
        else:
            y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2).astype(x.dtype)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y
