"""Decoder layer, model, and make_cache."""
from __future__ import annotations

import functools

import mlx.core as mx
import mlx.nn as nn

from ..cache import KDACache, KimiCache, MLACache, write_rows
from ..config import ModelConfig
from ..ops.attention import INFO_INTS, decode_info, decode_kernel_attention, decode_kernel_plan
from ..settings import held_kernel_settings
from .common import MLP, Linear, compile_decode, compiled_for, kernels_traceable, one_token
from .kda import KimiDeltaAttention
from .mla import KimiMLA
from .moe import KimiMoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.is_mla = cfg.is_mla(idx)
        self.self_attn = KimiMLA(cfg) if self.is_mla else KimiDeltaAttention(cfg)
        self.mlp = KimiMoE(cfg) if cfg.is_moe(idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        if one_token(x) and cache is not None and cache.offset and compile_decode():
            c = compiled_for(self)
            if c.safe:
                return self._decode(x, cache, c)
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return self._mlp_block(h)

    def _mlp_block(self, h: mx.array) -> mx.array:
        return h + self.mlp(self.post_attention_layernorm(h))

    def _decode(self, x: mx.array, cache, compiled) -> mx.array:
        """One token as two compiled pieces around the attention kernel: everything before it
        (norm, projections, short conv / query absorption) and everything after it (o_proj,
        residuals, MoE). Same maths as __call__: fused elementwise ops, and no graph to rebuild.
        Where the kernels are GPU kernels that mx.compile can trace (not the CPU's MLX ops or
        emulator), a layer is one compiled piece, kernels included: a KDA layer (its state has a
        fixed shape), and an MLA layer with its cache write (_mla_token)."""
        attn = self.self_attn
        if kernels_traceable():
            if not self.is_mla:
                step = compiled("token", self._kda_token)
                h, conv, state = step(x, cache.conv, cache.state)
                cache.advance(conv, state, x.shape[1])
                return h
            h = self._mla_token(x, cache, compiled)
            if h is not None:
                return h
        state = () if self.is_mla else (cache.conv,)
        parts = compiled("pre", self._pre)(x, *state)
        o = attn.attend(parts, cache)
        return compiled("post", self._post)(x, o)

    # the pieces of a decode token (pure functions of their arguments, for mx.compile)
    def _pre(self, x: mx.array, *state):
        """Before the kernel: norm, projections, short conv / query absorption."""
        return self.self_attn.decode_project(self.input_layernorm(x), *state)

    def _post(self, x: mx.array, o: mx.array) -> mx.array:
        """After the kernel: o_proj, residuals, MLP / MoE."""
        return self._mlp_block(x + self.self_attn.output(o, x.dtype))

    def _mla_token(self, x: mx.array, cache: MLACache, compiled):
        """An MLA layer's decode step as one compiled piece, the cache write and the attention
        kernels inside; the depth goes in as a small int array, so a trace serves every token
        until the segments or the kernels' split counts change. None when the kernels don't take
        this cache (the plain pieces run)."""
        attn = self.self_attn
        B, T, _ = x.shape
        views, row = cache.tail_step(B, T, attn.rank + attn.rope, x.dtype)
        plan = decode_kernel_plan((B, attn.num_heads, T, attn.rank + attn.rope), [v[:3] for v in views],
                                  cache.offset, attn.rank)
        if plan is None:
            return None
        launches, infos = plan
        key = ("mla_token", cache.group_size, launches, tuple(v[3] for v in views))
        step = compiled(key, functools.partial(self._mla_token_fn, cache.group_size, launches), limit=8)
        info = decode_info(row, *(v for i in infos for v in i))
        h, data = step(x, info, [v[0] for v in views])
        cache.commit_tail(data, T)
        return h

    def _mla_token_fn(self, group_size: int, launches, x: mx.array, info: mx.array, datas: list):
        """(output, the tail segment's new data); datas: the segments', the tail last; info = [tail
        row, then 5 ints a segment]."""
        qa, rows = self._pre(x)
        datas = [*datas[:-1], write_rows(datas[-1], rows, info[:1], group_size)]
        n = INFO_INTS
        infos = [info[1 + n * i: 1 + n * (i + 1)] for i in range(len(datas))]
        o = decode_kernel_attention(qa, datas, infos, launches, self.self_attn.scale)
        return self._post(x, o), datas[-1]

    def _kda_token(self, x: mx.array, conv: mx.array, state: mx.array):
        """A KDA layer's decode step, kernel included, the short convs inside it: (output, new
        conv state, new state)."""
        parts = self.self_attn.decode_project(self.input_layernorm(x), conv, defer_conv=True)
        o, state, conv = self.self_attn.gated_delta(parts, state)
        return self._post(x, o), conv, state


class KimiLinearModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, input_ids: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(input_ids)
        caches = cache if cache is not None else [None] * len(self.layers)
        with held_kernel_settings():
            for layer, c in zip(self.layers, caches):
                h = layer(h, c)
        return self.norm(h)


class Model(nn.Module):
    """`model(input_ids [B, T], cache=None) -> logits [B, T, vocab]`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = KimiLinearModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def __call__(self, input_ids: mx.array, cache: KimiCache | None = None, last_n: int | None = None) -> mx.array:
        """last_n: only compute logits for the last n positions (prefill needs one, not [T, vocab])."""
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        h = self.model(input_ids, cache)
        if last_n is not None:
            h = h[:, -last_n:]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self, mla_bits: int | None = None) -> KimiCache:
        """A fresh cache; pass it to successive calls to continue one sequence (batch fixed by the first call)."""
        return KimiCache(MLACache(bits=mla_bits) if layer.is_mla else KDACache() for layer in self.layers)
