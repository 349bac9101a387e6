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
from .common import Linear, derived, joined_linear, linear_weight, one_token


class KimiMLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = H = cfg.num_attention_heads
        self.nope = cfg.qk_nope_head_dim
        self.rope = cfg.qk_rope_head_dim  # never rotated (NoPE), still part of the score
        self.v_dim = cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        d = cfg.hidden_size
        self.q_proj = Linear(d, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(d, self.rank + self.rope, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.rank, eps=cfg.kv_a_norm_eps)
        self.kv_b_proj = Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, d, bias=False)
        self.scale = cfg.qk_head_dim ** -0.5

    def __call__(self, x: mx.array, cache: MLACache | None = None) -> mx.array:
        B, T, _ = x.shape
        if T < expand_min_queries():  # the absorbed form
            return self.output(self.attend(self.decode_project(x), cache), x.dtype)
        q, rows = self.project(x)
        if cache is not None:
            cache.append(rows)
        source = cache if cache is not None else [rows]
        o = mla_prefill_attention(q, source, self._expand_kv, self.scale, self.rope, self.v_dim,
                                  expand=self._expand)  # [B, T, H, v]
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim))

    # The absorbed path is project -> absorb -> attend -> output; a compiled decode step runs
    # project + absorb and output compiled, and attend (cache append + kernel) between them, or,
    # with GPU kernels, all of it as one piece (DecoderLayer._mla_token).
    def project(self, x: mx.array, join: bool = False):
        """x [B, T, d] -> (q [B, T, H, nope + rope], cache rows [B, T, rank + rope]).
        join: q_proj and kv_a_proj_with_mqa run as one matmul (joined_linear)."""
        B, T, _ = x.shape
        both = joined_linear(self, ("q_proj", "kv_a_proj_with_mqa")) if join else None
        q, ckv = both(x) if both is not None else (self.q_proj(x), self.kv_a_proj_with_mqa(x))
        q = q.reshape(B, T, self.num_heads, self.nope + self.rope)
        latent = self.kv_a_layernorm(ckv[..., : self.rank])
        return q, mx.concatenate([latent, ckv[..., self.rank:]], axis=-1)

    def decode_project(self, x: mx.array):
        """What attend takes: (absorbed queries, cache rows)."""
        q, rows = self.project(x, join=one_token(x))
        return self.absorb(q), rows

    def _absorb_weights(self, dtype):
        # split once, not every token (a quantized kv_b_proj would be dequantized per token)
        sources = (self.kv_b_proj.get("weight"), self.kv_b_proj.get("scales"), self.kv_b_proj.get("biases"))
        return derived(self, "_split_kv_b_cache", sources, lambda: self._split_kv_b(dtype), dtype)

    def absorb(self, q: mx.array) -> mx.array:
        """q [B, T, H, nope + rope] -> [B, H, T, rank + rope]: q_nope . (W_uk c) == (W_uk^T q_nope) . c"""
        q = q.transpose(0, 2, 1, 3)
        w_uk, _ = self._absorb_weights(q.dtype)
        return mx.concatenate([q[..., : self.nope] @ w_uk, q[..., self.nope:]], axis=-1)

    def attend(self, parts, cache: MLACache | None) -> mx.array:
        """Appends the rows to the cache, then absorbed attention -> latent output [B, H, T, rank]."""
        qa, rows = parts
        if cache is not None:
            cache.append(rows)
        return mla_decode_attention(qa, cache if cache is not None else [rows], self.scale, self.rank)

    def output(self, o_lat: mx.array, dtype) -> mx.array:
        B, H, T, _ = o_lat.shape
        _, w_uv_t = self._absorb_weights(dtype)
        o = (o_lat @ w_uv_t.astype(o_lat.dtype)).transpose(0, 2, 1, 3)  # [B, T, H, v]
        return self.o_proj(o.reshape(B, T, H * self.v_dim).astype(dtype))

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
