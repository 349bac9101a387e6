"""Kimi Delta Attention layer: projections, causal short convs, gates, gated output norm."""
from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..cache import KDACache
from ..config import ModelConfig
from ..ops.kda import kda_gated, kda_gated_conv
from .common import Linear, derived, joined_linear, linear_weight


class ShortConvWeight(nn.Module):
    """Depthwise causal conv weight, stored [channels, kernel] (published: [channels, 1, kernel])."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel))


def causal_short_conv(x: mx.array, weight: mx.array, state: mx.array | None, weight_t: mx.array | None = None):
    """x [B, T, C], weight [C, Kc], state [B, Kc-1, C] (previous inputs) -> (silu(conv), new state).
    weight_t: weight.T made once, if the caller keeps one."""
    B, T, C = x.shape
    kc = weight.shape[1]
    if state is None:
        state = mx.zeros((B, kc - 1, C), dtype=x.dtype)
    xs = mx.concatenate([state.astype(x.dtype), x], axis=1)
    if T == 1:  # decode: one product and one sum instead of kc of each (a step's graph is host-bound)
        w_t = weight.T if weight_t is None else weight_t
        out = (xs * w_t.astype(x.dtype)).sum(axis=1, keepdims=True)
    else:
        w = weight.astype(x.dtype)
        out = xs[:, 0:T] * w[:, 0]
        for j in range(1, kc):
            out = out + xs[:, j:j + T] * w[:, j]
    return nn.silu(out), xs[:, -(kc - 1):]


class DeferredConv(NamedTuple):
    """A decode token's q|k|v projections [B, 1, C] before the short convs, the conv state
    [B, KC-1, C] and the joined conv weight [C, KC] (w_t: its transposed view), and the first
    low-rank projections f_a, g_a [B, 1, K], for a kernel that runs the convs and the second
    projections itself (KimiDeltaAttention.gated_delta)."""
    x: mx.array
    conv_state: mx.array
    w: mx.array
    w_t: mx.array
    f_a: mx.array
    g_a: mx.array


# the layers that read a token's hidden state: one joined matmul in decode (joined_linear)
_INPUT_PROJ = ("q_proj", "k_proj", "v_proj", "f_a_proj", "g_a_proj", "b_proj")


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = H = cfg.linear_num_heads
        self.head_dim = K = cfg.linear_head_dim
        P = H * K
        d = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.q_proj = Linear(d, P, bias=False)
        self.k_proj = Linear(d, P, bias=False)
        self.v_proj = Linear(d, P, bias=False)
        self.q_conv1d = ShortConvWeight(P, cfg.short_conv_kernel_size)
        self.k_conv1d = ShortConvWeight(P, cfg.short_conv_kernel_size)
        self.v_conv1d = ShortConvWeight(P, cfg.short_conv_kernel_size)
        self.f_a_proj = Linear(d, K, bias=False)
        self.f_b_proj = Linear(K, P, bias=False)
        self.dt_bias = mx.zeros((P,), dtype=mx.float32)
        self.A_log = mx.zeros((H,), dtype=mx.float32)
        self.b_proj = Linear(d, H, bias=False)
        self.g_a_proj = Linear(d, K, bias=False)
        self.g_b_proj = Linear(K, P, bias=False)
        self.o_norm = nn.RMSNorm(K, eps=cfg.rms_norm_eps)
        self.o_proj = Linear(P, d, bias=False)

    def __call__(self, x: mx.array, cache: KDACache | None = None) -> mx.array:
        parts = self.project(x, cache.conv if cache is not None else None)
        return self.output(self.attend(parts, cache), x.dtype)

    # A layer is project -> attend -> output; a compiled decode step runs project and output
    # compiled (pure functions of their arguments) and attend, the kernel, between them.
    def project(self, x: mx.array, conv_state: mx.array | None, join: bool = False, defer_conv: bool = False):
        """x [B, T, d] -> (q_raw, k_raw, v, f, gate [B, T, H, K], b_raw [B, T, H], new conv state).
        join: the six projections that read x run as one matmul (_input_projections).
        defer_conv: a decode token's short convs and the second projections of f and the gate are
        left to the kernel (gated_delta): the first item is then a DeferredConv, the rest None but b."""
        T = x.shape[1]
        qkv, f_a, g_a, b = self._input_projections(x, join)
        ws = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        # joined once, not every token, and transposed for decode (a view: see common.transposed)
        w, w_t = derived(self, "_conv_w_cache", ws, lambda: (w := mx.concatenate(ws, axis=0), w.T))
        deferred = DeferredConv(qkv, conv_state, w, w_t, f_a, g_a)
        if defer_conv and T == 1 and conv_state is not None:
            return deferred, None, None, None, None, b, None
        q, k, v, f, gate, conv_state = self._finish(deferred)
        return q, k, v, f, gate, b, conv_state

    def _input_projections(self, x: mx.array, join: bool):
        """(q|k|v, f_a, g_a, b) of x. join: one matmul and a split of its output (views), or two
        matmuls where the six layers can't be joined as one (e.g. mixed quantization)."""
        if join:
            six = joined_linear(self, _INPUT_PROJ, split=False)
            if six is not None:
                P3 = sum(self[n].weight.shape[0] for n in _INPUT_PROJ[:3])
                K = self.f_a_proj.weight.shape[0]
                return mx.split(six(x), [P3, P3 + K, P3 + 2 * K], axis=-1)
            qkv_fn = joined_linear(self, _INPUT_PROJ[:3], split=False)
            low_fn = joined_linear(self, _INPUT_PROJ[3:])
            if qkv_fn is not None and low_fn is not None:
                return (qkv_fn(x), *low_fn(x))
        qkv = mx.concatenate([self.q_proj(x), self.k_proj(x), self.v_proj(x)], axis=-1)
        return qkv, self.f_a_proj(x), self.g_a_proj(x), self.b_proj(x)

    def _finish(self, d: DeferredConv):
        """What project leaves to the kernel with defer_conv, in MLX ops: (q_raw, k_raw, v, f,
        gate [B, T, H, K], new conv state)."""
        B, T, _ = d.x.shape
        H, K = self.num_heads, self.head_dim
        P = H * K
        f = self.f_b_proj(d.f_a).reshape(B, T, H, K)
        gate = self.g_b_proj(d.g_a).reshape(B, T, H, K)
        qkv, conv_state = causal_short_conv(d.x, d.w, d.conv_state, d.w_t)
        q, k, v = (qkv[..., i * P:(i + 1) * P].reshape(B, T, H, K) for i in range(3))
        return q, k, v, f, gate, conv_state

    def decode_project(self, x: mx.array, conv_state: mx.array | None, defer_conv: bool = False):
        """What attend takes, for a compiled decode step (joined projections); defer_conv: see project."""
        return self.project(x, conv_state, join=True, defer_conv=defer_conv)

    def attend(self, parts, cache: KDACache | None) -> mx.array:
        """The gated delta rule and the gated norm (the kernel); writes the cache. -> o fp32 [B, T, H, V]."""
        o, state, conv = self.gated_delta(parts, cache.state if cache is not None else None)
        if cache is not None:
            cache.advance(conv, state, o.shape[1])
        return o

    def gated_delta(self, parts, state: mx.array | None):
        """attend without the cache: (o fp32 [B, T, H, V], new state, new conv state)."""
        q, k, v, f, gate, b, conv = parts
        if isinstance(q, DeferredConv):
            # the second projections' dense weights, made once (a quantized layer's dequantized)
            ws = tuple(m.get(n) for m in (self.f_b_proj, self.g_b_proj) for n in ("weight", "scales", "biases"))
            low = derived(self, "_low_rank_w", ws, lambda: (linear_weight(self.f_b_proj), linear_weight(self.g_b_proj)))
            r = kda_gated_conv(q.x, q.conv_state, q.w, q.f_a, q.g_a, low, b, self.dt_bias, self.A_log,
                               self.o_norm.weight, self.eps, state)
            if r is not None:
                return r
            q, k, v, f, gate, conv = self._finish(q)  # no kernel took it
        o, state = kda_gated(q, k, v, f, b, self.dt_bias, self.A_log, self.o_norm.weight, gate, self.eps, state)
        return o, state, conv

    def output(self, o: mx.array, dtype) -> mx.array:
        B, T = o.shape[:2]
        return self.o_proj(o.astype(dtype).reshape(B, T, -1))
