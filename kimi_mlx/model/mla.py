"""NoPE Multi-head Latent Attention with a latent-only cache.

Decode and short chunks use the absorbed form (scores over kv_lora_rank + rope per head). Long
prefill chunks expand per-head keys/values from the cached latents block by block instead:
expanding a key costs about as much as ~170 queries' absorbed scores against it, and the
expanded scores are ~3x cheaper (qk_head_dim + v_head_dim vs 2 * kv_lora_rank + rope)."""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import MLACache
from ..config import ModelConfig
from ..ops.attention import expand_min_queries, mla_decode_attention, mla_prefill_attention
from .common import derived, linear_weight


class KimiMLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = H = cfg.num_attention_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim  # never rotated (NoPE), still part of the score
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=cfg.kv_a_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)
        self.scale = cfg.qk_head_dim ** -0.5

    def __call__(self, x: mx.array, cache: MLACache | None = None) -> mx.array:
        B, T, _ = x.shape
        H = self.num_heads
        q = self.q_proj(x).reshape(B, T, H, self.nope + self.rope)
        ckv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(ckv[..., : self.rank])
        rows = mx.concatenate([latent, ckv[..., self.rank:]], axis=-1)  # [B, T, rank + rope]

        if cache is not None:
            cache.append(rows)
            source = cache
        else:
            source = [rows]
        if T >= expand_min_queries():
            o = mla_prefill_attention(q, source, self._expand_kv, self.scale, self.rope, self.v_dim,
                                      expand=self._expand)  # [B, T, H, v]
        else:
            o = self._absorbed(q.transpose(0, 2, 1, 3), source).transpose(0, 2, 1, 3)
        return self.o_proj(o.reshape(B, T, H * self.v_dim))

    def _expand_kv(self, rows: mx.array) -> mx.array:
        """Cached rows [B, n, rank + rope] -> per-head [k_nope | v] [B, n, H, nope + v]."""
        B, n, _ = rows.shape
        return self.kv_b_proj(rows[..., : self.rank]).reshape(B, n, self.num_heads, self.nope + self.v_dim)

    def _expand(self, rows: mx.array):
        """Cached rows [B, n, rank + rope] -> per-head k [B, H, n, qk_head_dim], v [B, H, n, v]."""
        B, n, _ = rows.shape
        H = self.num_heads
        kv = self._expand_kv(rows).transpose(0, 2, 1, 3)
        k_pe = mx.broadcast_to(rows[:, None, :, self.rank:], (B, H, n, self.rope))
        k = mx.concatenate([kv[..., : self.nope], k_pe.astype(kv.dtype)], axis=-1)
        return k, kv[..., self.nope:]

    def _split_kv_b(self, dtype):
        """(W_uk [H, nope, rank], W_uv^T [H, rank, v]) out of kv_b_proj, in dtype."""
        H = self.num_heads
        w = linear_weight(self.kv_b_proj).reshape(H, self.nope + self.v_dim, self.rank).astype(dtype)
        return w[:, : self.nope], mx.contiguous(w[:, self.nope:].transpose(0, 2, 1))

    def _absorbed(self, q: mx.array, source) -> mx.array:
        # split once, not every token (a quantized kv_b_proj would be dequantized per token)
        sources = (self.kv_b_proj.get("weight"), self.kv_b_proj.get("scales"), self.kv_b_proj.get("biases"))
        w_uk, w_uv_t = derived(self, "_split_kv_b_cache", sources, lambda: self._split_kv_b(q.dtype), q.dtype)
        # absorb W_uk into the query: q_nope . (W_uk c) == (W_uk^T q_nope) . c
        q_lat = q[..., : self.nope] @ w_uk  # [B, H, T, rank]
        qa = mx.concatenate([q_lat, q[..., self.nope:]], axis=-1)

        o_lat = mla_decode_attention(qa, source, self.scale, self.rank)  # [B, H, T, rank]
        return o_lat @ w_uv_t.astype(o_lat.dtype)  # [B, H, T, v]
