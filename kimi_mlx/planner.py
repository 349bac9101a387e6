"""Memory and time planner for long-context Kimi Linear runs.

Everything is arithmetic on the model config, so a refusal ("this document will
not fit") can be given before any weights are loaded. The config may be a
``ModelConfig`` (0-indexed ``kda_layers`` / ``mla_layers``), any object with the
same attribute names, a transformers-style config with ``linear_attn_config``,
or the plain dict of the published ``config.json`` (whose layer lists are
1-indexed).

Sizes are bytes; human output uses decimal GB (1e9 bytes).

What is counted:

* weights: every tensor of the checkpoint. Linear and embedding matrices are
  quantized with ``bits`` (plus one 16-bit scale and one 16-bit bias per group
  of ``group_size`` weights, as ``mx.quantize`` stores them). The MoE router,
  norms and conv filters stay 16-bit; ``A_log``, ``dt_bias`` and the router's
  correction bias stay fp32.
* per-sequence state: KDA recurrent state (fp32 [H, K, V] per KDA layer), the
  short-conv tail ((kernel-1) x 3P per KDA layer, 16-bit), and the MLA latent
  cache ([kv_lora_rank + qk_rope_head_dim] per token per MLA layer), in one
  segment reserved for the context (at least ``PAGE_TOKENS`` rows) as
  ``kimi_mlx.cache.MLACache`` keeps it. With ``mla_bits=8`` every row is 8-bit
  + per-group scale/bias.
* prefill temporaries for one chunk (see :func:`prefill_peak_bytes`).
* a fixed runtime overhead (MLX/Metal runtime, Python, tokenizer, token ids).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from .cache import PAGE_TOKENS
from .config import ConfigError, ModelConfig
from .ops.attention import TILE_ELEMS as SCORE_TILE_ELEMS  # the largest fp32 score tile

__all__ = [
    "Plan",
    "PlanError",
    "param_count",
    "param_breakdown",
    "weight_bytes",
    "weight_bytes_by_layer",
    "kda_state_bytes",
    "mla_bytes_per_token",
    "cache_bytes",
    "prefill_peak_bytes",
    "plan",
    "max_context",
    "check_fits",
    "machine_memory_bytes",
    "estimate_prefill_seconds",
    "format_bytes",
    "format_duration",
    "DEFAULT_CHUNK_TOKENS",
    "RUNTIME_OVERHEAD_BYTES",
    "MACOS_USABLE_FRACTION",
]

GB = 1e9
# KDA chunked-scan block length (intra-chunk [C, C] matrices per head).
KDA_CHUNK = 64
DEFAULT_CHUNK_TOKENS = 2048
# MLX + Metal runtime, Python, the tokenizer and a 1M-token id list.
RUNTIME_OVERHEAD_BYTES = 1 << 30
# On macOS the GPU shares RAM with the OS and every other app, and Metal's
# recommended working set is ~65-75% of RAM; going past it makes the system swap
# or the GPU stall. 75% is the usable share unless the user raised the wired
# limit (sysctl iogpu.wired_limit_mb), which is then taken as the budget.
MACOS_USABLE_FRACTION = 0.75
# On Linux MemAvailable already excludes what other processes use; keep 10%
# of it free for the page cache and allocator slack.
LINUX_AVAILABLE_FRACTION = 0.90
# Lazy graphs keep some inputs and outputs alive together; pad estimates.
_PREFILL_MARGIN = 1.25


class PlanError(ValueError):
    """A context will not fit in memory. ``plan`` holds the numbers."""

    def __init__(self, message: str, plan: "Optional[Plan]" = None):
        super().__init__(message)
        self.plan = plan


# --------------------------------------------------------------------------
# config access
# --------------------------------------------------------------------------


def _config(cfg: "ModelConfig | dict") -> ModelConfig:
    """The ModelConfig (config.json parsed once, by config.py); a dict is parsed here."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, dict):
        try:
            return ModelConfig.from_dict(cfg)
        except ConfigError as e:
            raise PlanError(str(e)) from None
    raise TypeError(f"the planner takes a ModelConfig or a config.json dict, not {type(cfg).__name__}")


# --------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------


def param_breakdown(cfg: "ModelConfig | dict") -> "dict[str, int]":
    """Parameter counts by storage class.

    ``matrix``: linear/embedding weights (quantized with the model);
    ``half``: 16-bit tensors never quantized (router, norms, conv filters);
    ``fp32``: tensors kept in fp32 (A_log, dt_bias, router correction bias).
    """
    a = _config(cfg)
    out = _edge_params(a)
    for i in range(a.num_hidden_layers):
        for k, v in _layer_params(a, i).items():
            out[k] += v
    return out


def _edge_params(a: ModelConfig) -> "dict[str, int]":
    """The embedding, the final norm and the head."""
    d = a.hidden_size
    return {"matrix": a.vocab_size * d * (1 if a.tie_word_embeddings else 2), "half": d, "fp32": 0}


def _layer_params(a: ModelConfig, i: int) -> "dict[str, int]":
    d = a.hidden_size
    matrix = half = fp32 = 0
    P = a.linear_num_heads * a.linear_head_dim
    if a.is_mla(i):
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        matrix += a.num_attention_heads * qk * d  # q_proj (no q LoRA: ModelConfig refuses one)
        matrix += (a.kv_lora_rank + a.qk_rope_head_dim) * d  # kv_a_proj_with_mqa
        half += a.kv_lora_rank  # kv_a_layernorm
        matrix += a.num_attention_heads * (a.qk_nope_head_dim + a.v_head_dim) * a.kv_lora_rank  # kv_b_proj
        matrix += d * a.num_attention_heads * a.v_head_dim  # o_proj
    else:
        matrix += 3 * P * d  # q, k, v
        half += 3 * P * a.short_conv_kernel_size  # depthwise short convs
        matrix += a.linear_head_dim * d + P * a.linear_head_dim  # f_a, f_b (gate low-rank)
        fp32 += P + a.linear_num_heads  # dt_bias (per channel), A_log (per head)
        matrix += a.linear_num_heads * d  # b_proj (beta)
        matrix += a.linear_head_dim * d + P * a.linear_head_dim  # g_a, g_b (output gate)
        half += a.linear_head_dim  # o_norm
        matrix += d * P  # o_proj
    half += 2 * d  # input / post-attention norms
    if a.is_moe(i):
        half += a.num_experts * d  # router
        fp32 += a.num_experts  # e_score_correction_bias
        matrix += a.num_experts * 3 * a.moe_intermediate_size * d
        matrix += 3 * a.num_shared_experts * a.moe_intermediate_size * d
    else:
        matrix += 3 * a.intermediate_size * d
    return {"matrix": matrix, "half": half, "fp32": fp32}


def param_count(cfg: "ModelConfig | dict") -> int:
    """Total number of parameters."""
    return sum(param_breakdown(cfg).values())


def _quantized_bytes(n: int, bits: int, group_size: int) -> float:
    if bits >= 16:
        return n * bits / 8
    # packed weights + one 16-bit scale and one 16-bit bias per group
    return n * bits / 8 + math.ceil(n / group_size) * 4


def weight_bytes(cfg: "ModelConfig | dict", bits: int = 16, group_size: int = 64) -> int:
    """Bytes of all weights with matrices at ``bits`` (16 = unquantized bf16)."""
    return _bytes_of(param_breakdown(cfg), bits, group_size)


def _bytes_of(b: "dict[str, int]", bits: int, group_size: int) -> int:
    if bits not in (2, 3, 4, 5, 6, 8, 16, 32):
        raise ValueError(f"unsupported weight bits: {bits}")
    return int(_quantized_bytes(b["matrix"], bits, group_size) + 2 * b["half"] + 4 * b["fp32"])


def weight_bytes_by_layer(cfg: "ModelConfig | dict", bits: int = 16, group_size: int = 64) -> "tuple[int, list[int]]":
    """(bytes of the embedding, final norm and head; [bytes of decoder layer i]): how a pipeline
    split weighs its parts. Their sum is weight_bytes up to the rounding of whole groups."""
    a = _config(cfg)
    return (_bytes_of(_edge_params(a), bits, group_size),
            [_bytes_of(_layer_params(a, i), bits, group_size) for i in range(a.num_hidden_layers)])


# --------------------------------------------------------------------------
# per-sequence state
# --------------------------------------------------------------------------


def kda_state_bytes(cfg: "ModelConfig | dict", batch: int = 1, conv_bytes: int = 2) -> "tuple[int, int]":
    """(recurrent state bytes, conv-tail bytes) for all KDA layers; independent of length."""
    a = _config(cfg)
    n = len(a.kda_layers)
    state = n * a.linear_num_heads * a.linear_head_dim * a.linear_head_dim * 4 * batch  # fp32 [H, K, V]
    conv = n * 3 * a.linear_num_heads * a.linear_head_dim * max(0, a.short_conv_kernel_size - 1) * conv_bytes * batch
    return state, conv


def _mla_row_bytes(a: ModelConfig, mla_bits: int, group_size: int) -> float:
    D = a.kv_lora_rank + a.qk_rope_head_dim
    if mla_bits >= 16:
        return D * mla_bits / 8
    if mla_bits != 8:
        raise ValueError(f"MLA cache bits must be 16 or 8, got {mla_bits}")
    return D + math.ceil(D / group_size) * 4  # 8-bit rows + 16-bit scale and bias per group


def mla_bytes_per_token(cfg: "ModelConfig | dict", mla_bits: int = 16, group_size: int = 64) -> float:
    """MLA cache bytes per token of context, summed over MLA layers (batch 1)."""
    a = _config(cfg)
    return len(a.mla_layers) * _mla_row_bytes(a, mla_bits, group_size)


def _mla_cache_bytes(a: ModelConfig, tokens: int, batch: int, mla_bits: int, group_size: int,
                     page_tokens: int, n_mla: Optional[int] = None) -> int:
    n_mla = len(a.mla_layers) if n_mla is None else n_mla
    if tokens <= 0 or n_mla == 0:
        return 0
    # one segment reserved for the whole context (generation and prefill reserve it), never
    # smaller than page_tokens rows; 8-bit rows are quantized as they are appended
    rows = max(tokens, page_tokens)
    return int(n_mla * batch * rows * _mla_row_bytes(a, min(mla_bits, 16), group_size))


def _dequant_bytes(a: ModelConfig, tokens: int, batch: int, mla_bits: int, page_tokens: int,
                   n_mla: Optional[int] = None) -> int:
    """16-bit copy of one MLA layer's quantized rows while the MLX-ops attention reads them.

    The plain path (CPU) dequantizes a layer's segment before attending to it, so an 8-bit cache
    costs one layer's worth of bf16 rows on top (one layer at a time, not all seven); the GPU
    kernels dequantize in the kernel and need none of it (not counted: the estimate stays safe).
    """
    if mla_bits >= 16 or tokens <= 0 or not (len(a.mla_layers) if n_mla is None else n_mla):
        return 0
    return int(batch * tokens * (a.kv_lora_rank + a.qk_rope_head_dim) * 2)


def _context_bytes(a: ModelConfig, tokens: int, batch: int, mla_bits: int, group_size: int,
                   page_tokens: int, n_mla: Optional[int] = None) -> int:
    return (_mla_cache_bytes(a, tokens, batch, mla_bits, group_size, page_tokens, n_mla)
            + _dequant_bytes(a, tokens, batch, mla_bits, page_tokens, n_mla))


def cache_bytes(cfg: "ModelConfig | dict", context_tokens: int, batch: int = 1, mla_bits: int = 16, *,
                group_size: int = 64, page_tokens: int = PAGE_TOKENS) -> int:
    """All per-sequence state for ``context_tokens`` of context.

    KDA recurrent state (fp32) + conv tails + MLA latent cache. ``mla_bits`` is
    16 (bf16) or 8 (8-bit with per-group scale/bias). ``page_tokens=0`` counts
    rows exactly instead of whole pages.
    """
    a = _config(cfg)
    state, conv = kda_state_bytes(a, batch)
    return state + conv + _mla_cache_bytes(a, context_tokens, batch, mla_bits, group_size, page_tokens)


# --------------------------------------------------------------------------
# prefill temporaries
# --------------------------------------------------------------------------


def prefill_peak_bytes(cfg: "ModelConfig | dict", chunk_tokens: int, *, batch: int = 1, act_bytes: int = 2,
                       all_logits: bool = False) -> int:
    """Approximate peak of activation temporaries while prefilling one chunk.

    Layers run one after another, so the peak is the hidden-state buffers plus
    the largest single layer's temporaries:

    * KDA: q/k/v projections and their conv outputs, fp32 gates, the chunked
      scan's per-head [C, C] intra-chunk matrices and [T, K] work arrays, the
      gated output.
    * MLA (absorbed form over the latent cache): per-head latent queries,
      fp32 accumulators, and a few score tiles of at most SCORE_TILE_ELEMS
      (so the cost does not grow with context).
    * MoE: router scores, the token copies per chosen expert and the expert
      hidden activations.

    Logits are for the last position only unless ``all_logits``. The sum is
    padded by 25% for tensors a lazy graph keeps alive together.
    """
    a = _config(cfg)
    T = max(0, int(chunk_tokens)) * batch
    if T == 0:
        return 0
    d = a.hidden_size
    P = a.linear_num_heads * a.linear_head_dim

    hidden = 3 * T * d * act_bytes  # residual stream, normed input, layer output

    kda = 0
    if a.kda_layers:
        kda = (
            2 * 3 * T * P * act_bytes  # q, k, v before and after the short conv
            + 2 * T * P * 4  # gate (fp32, per channel) and its cumulative sum
            + T * a.linear_num_heads * KDA_CHUNK * 4 * 2  # intra-chunk [C, C] per head (A and its inverse)
            + 2 * T * P * 4  # W / U work arrays of the chunked scan (fp32)
            + T * P * 4 + 2 * T * P * act_bytes  # fp32 output, output gate, gated output
        )

    mla = 0
    if a.mla_layers:
        D = a.kv_lora_rank + a.qk_rope_head_dim
        mla = (
            T * a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) * act_bytes  # q
            + T * a.num_attention_heads * D * act_bytes  # absorbed latent queries
            + T * a.num_attention_heads * a.kv_lora_rank * 4  # fp32 accumulators
            + 3 * SCORE_TILE_ELEMS * 4  # scores, exp, masked copy of one tile
            + T * a.num_attention_heads * a.v_head_dim * act_bytes  # values after kv_b
        )

    moe = 3 * T * a.intermediate_size * act_bytes if a.intermediate_size else 0
    if a.num_experts:
        k = a.num_experts_per_token or a.num_experts
        moe = max(moe,
                  T * a.num_experts * 4 * 2  # router logits and scores (fp32)
                  + 2 * T * k * d * act_bytes  # token copies sorted by expert, and outputs
                  + 3 * T * k * a.moe_intermediate_size * act_bytes  # gate, up, activation
                  + 3 * T * a.num_shared_experts * a.moe_intermediate_size * act_bytes)

    logits = (T if all_logits else batch) * a.vocab_size * 4
    return int(_PREFILL_MARGIN * (hidden + max(kda, mla, moe) + logits))


# --------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------


def format_bytes(n: float) -> str:
    """Decimal GB with two decimals (MB below 0.1 GB)."""
    if abs(n) < 0.1 * GB:
        return f"{n / 1e6:.1f} MB"
    return f"{n / GB:.2f} GB"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Plan:
    context_tokens: int
    batch: int
    bits: int
    group_size: int
    mla_bits: int
    chunk_tokens: int
    weights_bytes: int
    kda_state_bytes: int
    conv_state_bytes: int
    mla_cache_bytes: int
    prefill_bytes: int
    overhead_bytes: int
    machine_bytes: Optional[int]  # usable budget; None if unknown
    max_context_tokens: Optional[int]  # largest context that fits; None if unknown
    model_max_tokens: Optional[int] = None
    dequant_bytes: int = 0  # 8-bit MLA cache: one layer's pages dequantized while read
    prefill_seconds: Optional[float] = None
    notes: list = field(default_factory=list)

    @property
    def cache_bytes(self) -> int:
        return self.kda_state_bytes + self.conv_state_bytes + self.mla_cache_bytes

    @property
    def total_bytes(self) -> int:
        return sum(v for _, v in self.parts())

    def parts(self) -> "list[tuple[str, int]]":
        """Every term of total_bytes, named; they sum to it exactly."""
        rows = [("weights", self.weights_bytes), ("cache", self.cache_bytes), ("prefill", self.prefill_bytes)]
        if self.dequant_bytes:
            rows.append(("dequantized MLA pages", self.dequant_bytes))
        rows.append(("runtime", self.overhead_bytes))
        return rows

    def breakdown(self) -> str:
        """One line of every part: 'weights 4.9 MB + cache 0.9 MB + prefill 0.13 GB + runtime 1.07 GB'."""
        return " + ".join(f"{name} {format_bytes(v)}" for name, v in self.parts())

    @property
    def fits(self) -> bool:
        """True when the total is within the usable budget (or the budget is unknown)."""
        return self.machine_bytes is None or self.total_bytes <= self.machine_bytes

    @property
    def exceeds_model_limit(self) -> bool:
        return bool(self.model_max_tokens) and self.context_tokens > self.model_max_tokens

    def describe(self) -> str:
        w = "16-bit" if self.bits >= 16 else f"{self.bits}-bit, group {self.group_size}"
        kv = "bf16" if self.mla_bits >= 16 else f"{self.mla_bits}-bit"
        rows = [
            (f"weights ({w})", self.weights_bytes),
            ("KDA state (fp32, fixed size)", self.kda_state_bytes + self.conv_state_bytes),
            (f"MLA cache ({kv})", self.mla_cache_bytes),
            (f"prefill temporaries ({self.chunk_tokens:,}-token chunks)", self.prefill_bytes),
        ]
        if self.dequant_bytes:
            rows.append(("MLA pages dequantized while read", self.dequant_bytes))
        rows.append(("runtime overhead", self.overhead_bytes))
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"Memory plan for {self.context_tokens:,} tokens"
                 + (f" x {self.batch} sequences" if self.batch != 1 else "") + ":"]
        lines += [f"  {name:<{width}}{format_bytes(v):>10}" for name, v in rows]
        total = f"  {'total':<{width}}{format_bytes(self.total_bytes):>10}"
        if self.machine_bytes is None:
            total += "  (machine memory unknown)"
        else:
            total += (f"  of {format_bytes(self.machine_bytes)} usable: "
                      + ("fits" if self.fits else "does NOT fit"))
        lines.append(total)
        if self.max_context_tokens is not None:
            lines.append(f"  largest context that fits: {self.max_context_tokens:,} tokens")
        if self.exceeds_model_limit:
            lines.append(f"  note: beyond the model's trained length of {self.model_max_tokens:,} tokens")
        if self.prefill_seconds is not None:
            lines.append(f"  estimated prefill time: {format_duration(self.prefill_seconds)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _default_bits(cfg: ModelConfig) -> int:
    q = cfg.quantization
    if isinstance(q, dict) and q.get("bits"):
        return int(q["bits"])
    return 16


def _default_group(cfg: ModelConfig) -> int:
    q = cfg.quantization
    if isinstance(q, dict) and q.get("group_size"):
        return int(q["group_size"])
    return 64


def _max_tokens_for(a: ModelConfig, budget: float, batch: int, mla_bits: int, group_size: int,
                    page_tokens: int, n_mla: Optional[int] = None) -> int:
    """Largest n whose length-dependent bytes fit the budget (monotone in n)."""
    if budget < 0:
        return 0
    if not (len(a.mla_layers) if n_mla is None else n_mla):
        return sys.maxsize  # constant-size state: length is not memory-bound
    lo, hi = 0, 1
    while _context_bytes(a, hi, batch, mla_bits, group_size, page_tokens, n_mla) <= budget:
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _context_bytes(a, mid, batch, mla_bits, group_size, page_tokens, n_mla) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def plan(
    cfg: "ModelConfig | dict",
    context_tokens: int,
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mla_bits: int = 16,
    mla_group_size: int = 64,
    batch: int = 1,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    machine_bytes: Optional[int] = None,
    weights_bytes: Optional[int] = None,
    overhead_bytes: int = RUNTIME_OVERHEAD_BYTES,
    page_tokens: int = PAGE_TOKENS,
    tokens_per_second: Optional[float] = None,
    layers: Optional[range] = None,
    edges: bool = True,
) -> Plan:
    """Memory needed to hold ``context_tokens`` of context and prefill it.

    bits / group_size: weight quantization; default: the config's
        ``quantization`` entry, else 16-bit.
    machine_bytes: usable memory budget; default :func:`machine_memory_bytes`.
    weights_bytes: measured size of the loaded weights, overriding the estimate.
    tokens_per_second: prefill speed, to add a time estimate.
    layers / edges: a part of the model (a pipeline rank, kimi_mlx.distributed): only these decoder
        layers' weights and caches, and the embedding and head only with ``edges``.
    """
    a = _config(cfg)
    bits = _default_bits(a) if bits is None else int(bits)
    group_size = _default_group(a) if group_size is None else int(group_size)
    context_tokens = max(0, int(context_tokens))
    if machine_bytes is None:
        machine_bytes = machine_memory_bytes()
    n_mla = None
    if layers is None:
        wb = weight_bytes(a, bits, group_size) if weights_bytes is None else int(weights_bytes)
        state, conv = kda_state_bytes(a, batch)
    else:
        edge, per_layer = weight_bytes_by_layer(a, bits, group_size)
        wb = (sum(per_layer[i] for i in layers) + (edge if edges else 0)) if weights_bytes is None \
            else int(weights_bytes)
        n_kda = sum(1 for i in layers if not a.is_mla(i))
        state, conv = (x * n_kda // max(1, len(a.kda_layers)) for x in kda_state_bytes(a, batch))
        n_mla = len(layers) - n_kda
    chunk = min(chunk_tokens, context_tokens) if context_tokens else chunk_tokens
    pre = prefill_peak_bytes(a, chunk, batch=batch)
    mla = _mla_cache_bytes(a, context_tokens, batch, mla_bits, mla_group_size, page_tokens, n_mla)

    max_ctx = None
    if machine_bytes is not None:
        fixed = wb + state + conv + prefill_peak_bytes(a, chunk_tokens, batch=batch) + overhead_bytes
        max_ctx = _max_tokens_for(a, machine_bytes - fixed, batch, mla_bits, mla_group_size,
                                  page_tokens, n_mla)
        if max_ctx == sys.maxsize:
            max_ctx = None if machine_bytes >= fixed else 0
    p = Plan(
        context_tokens=context_tokens, batch=batch, bits=bits, group_size=group_size,
        mla_bits=mla_bits, chunk_tokens=chunk, weights_bytes=wb, kda_state_bytes=state,
        conv_state_bytes=conv, mla_cache_bytes=mla, prefill_bytes=pre,
        dequant_bytes=_dequant_bytes(a, context_tokens, batch, mla_bits, page_tokens, n_mla),
        overhead_bytes=overhead_bytes, machine_bytes=machine_bytes, max_context_tokens=max_ctx,
        model_max_tokens=int(a.model_max_length) if a.model_max_length else None,
    )
    if tokens_per_second:
        p.prefill_seconds = estimate_prefill_seconds(context_tokens, tokens_per_second)
    return p


def max_context(cfg: "ModelConfig | dict", machine_bytes: Optional[int] = None, bits: Optional[int] = None,
                **kwargs: Any) -> int:
    """Largest context (tokens) whose plan fits ``machine_bytes`` (0 if none does)."""
    p = plan(cfg, 0, bits=bits, machine_bytes=machine_bytes, **kwargs)
    if p.max_context_tokens is None:
        if p.machine_bytes is None:
            raise PlanError("machine memory is unknown; pass machine_bytes")
        return sys.maxsize
    return p.max_context_tokens


def check_fits(cfg: "ModelConfig | dict", context_tokens: int, **kwargs: Any) -> Plan:
    """The plan for ``context_tokens``; raises PlanError with the numbers if it won't fit.

    Takes the keyword arguments of :func:`plan`.
    """
    p = plan(cfg, context_tokens, **kwargs)
    if p.fits:
        return p
    msg = [
        f"{context_tokens:,} tokens of context need about {format_bytes(p.total_bytes)} ({p.breakdown()}), "
        f"but only {format_bytes(p.machine_bytes)} is usable on this machine.",
    ]
    if p.max_context_tokens:
        msg.append(f"At most {p.max_context_tokens:,} tokens fit with these settings.")
    else:
        msg.append("Even an empty context does not fit with these settings.")
    hints = []
    if p.mla_bits >= 16:
        alt = plan(cfg, context_tokens, **{**kwargs, "mla_bits": 8, "machine_bytes": p.machine_bytes})
        hints.append(f"an 8-bit MLA cache ({format_bytes(alt.total_bytes)} in total"
                     + (", fits)" if alt.fits else ")"))
    if p.bits > 4:
        alt = plan(cfg, context_tokens, **{**kwargs, "bits": 4, "machine_bytes": p.machine_bytes})
        hints.append(f"4-bit weights ({format_bytes(alt.total_bytes)} in total"
                     + (", fits)" if alt.fits else ")"))
    hints.append("fewer or shorter documents")
    msg.append("Options: " + "; ".join(hints) + ".")
    raise PlanError(" ".join(msg), p)


# --------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------


def _sysctl_int(name: str) -> Optional[int]:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _meminfo() -> "dict[str, int]":
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    info[key] = int(parts[0]) * 1024  # values are in kB
    except OSError:
        pass
    return info


def _cgroup_limit() -> Optional[int]:
    """Memory left under a container's cgroup limit, if one is set."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if not raw.isdigit() or int(raw) >= 1 << 60:
            return None  # "max" or the v1 "unlimited" sentinel
        used = 0
        try:
            with open(usage_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            pass
        return max(0, int(raw) - used)
    return None


def machine_memory_bytes(usable: bool = True) -> Optional[int]:
    """Memory this process can plan to use (``usable=False``: physical total).

    macOS (unified memory): 75% of ``hw.memsize``, or the GPU wired limit if
    the user raised it with ``sysctl iogpu.wired_limit_mb``. Linux: 90% of
    MemAvailable, capped by a cgroup limit. None if it cannot be found.
    """
    total = None
    if sys.platform == "darwin":
        total = _sysctl_int("hw.memsize")
        if not usable or total is None:
            return total
        wired_mb = _sysctl_int("iogpu.wired_limit_mb") or 0
        if wired_mb > 0:
            return min(total, wired_mb * 1024 * 1024)
        return int(total * MACOS_USABLE_FRACTION)
    info = _meminfo()
    total = info.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    if not usable:
        return total
    avail = info.get("MemAvailable")
    budget = int(avail * LINUX_AVAILABLE_FRACTION) if avail else int(total * MACOS_USABLE_FRACTION)
    cg = _cgroup_limit()
    if cg is not None:
        budget = min(budget, int(cg * LINUX_AVAILABLE_FRACTION))
    return budget


# ---------------------------------------------------------------------------
# measured prefill speed, remembered per model and device for the next estimate
# ---------------------------------------------------------------------------
SPEED_MIN_TOKENS = 1024  # shorter prefills are dominated by warm-up


def _speed_file():
    """$KIMI_MLX_HOME/prefill_speed.json when set (it moves everything the user keeps, as in the
    chat app), else in the cache root (KIMI_MLX_CACHE or the user cache dir)."""
    from pathlib import Path

    from ._native import cache_root
    from .settings import settings

    home = settings().home
    return (Path(home).expanduser() if home else Path(cache_root())) / "prefill_speed.json"


def _read_speeds() -> dict:
    import json

    try:
        data = json.loads(_speed_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: estimates are optional
        return {}


def record_prefill_speed(key: str, tokens: int, seconds: float) -> None:
    """Remember the speed of a finished prefill (best effort, written atomically)."""
    import json
    import tempfile

    if tokens < SPEED_MIN_TOKENS or seconds <= 0:
        return
    data = _read_speeds()
    data[key] = {"tokens_per_second": tokens / seconds, "tokens": int(tokens)}
    path = _speed_file()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".speed-")
        with os.fdopen(fd, "w") as fp:
            json.dump(data, fp)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def known_prefill_speed(key: str) -> Optional[float]:
    """Tokens/s of the last long prefill of this model on this device, if any."""
    v = _read_speeds().get(key)
    try:
        return float(v["tokens_per_second"]) if v else None
    except (KeyError, TypeError, ValueError):
        return None


def estimate_prefill_seconds(tokens: int, tokens_per_second: float) -> float:
    """Prefill time at a measured rate (tokens/s).

    A single rate is a lower bound at very long contexts: the KDA layers cost
    the same per token, but the 7 MLA layers attend to the whole prefix, so
    their share grows with the context length.
    """
    if tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    return max(0, tokens) / tokens_per_second
