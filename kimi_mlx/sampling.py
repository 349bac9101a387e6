"""Token samplers and logits processors.

Same semantics as mlx-lm's samplers (top-p, then min-p, then top-k, then a draw at
temperature `temp`; a sign-aware repetition penalty), written here because importing
`mlx_lm` pulls in transformers and torch (seconds of start-up). A sampler made with a
seed draws from its own key chain, so the same seed gives the same tokens whatever else
touched the global MLX random state in between.

A sampler maps log-probabilities [B, V] to token ids [B]; a logits processor maps
(tokens so far [N], logits [B, V]) to logits [B, V].
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import mlx.core as mx

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

__all__ = ["make_sampler", "make_logits_processors", "greedy", "apply_top_p", "apply_min_p", "apply_top_k",
           "Sampler", "LogitsProcessor"]

_NEG_INF = float("-inf")


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    order = mx.argsort(-logprobs, axis=-1)
    ranked = mx.take_along_axis(logprobs, order, axis=-1)
    probs = mx.exp(ranked.astype(mx.float32))
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    # a token is kept while the mass ranked above it is still short of top_p (the first always is)
    cutoff = mx.min(mx.where(before < top_p, ranked, float("inf")), axis=-1, keepdims=True)
    return mx.where(logprobs >= cutoff, logprobs, _NEG_INF)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens with probability >= min_p x the top token's probability."""
    floor = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= floor, logprobs, _NEG_INF)


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the top_k most likely tokens (ties at the k-th value are kept too)."""
    if top_k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.min(mx.topk(logprobs, top_k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logprobs >= kth, logprobs, _NEG_INF)


def _check(temp: float, top_p: float, top_k: int, min_p: float) -> None:
    if temp < 0:
        raise ValueError(f"temperature must be >= 0, got {temp}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top-p must be in (0, 1], got {top_p}")
    if top_k < 0 or int(top_k) != top_k:
        raise ValueError(f"top-k must be a non-negative integer, got {top_k}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min-p must be in [0, 1], got {min_p}")


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 seed: Optional[int] = None) -> Sampler:
    """A sampler over log-probabilities. temp == 0 (or top_k == 1) is greedy (argmax).

    Filters are applied in mlx-lm's order: top-p, then min-p, then top-k; the survivors
    are sampled at temperature `temp`. With `seed`, the sampler owns a PRNG key chain
    (reproducible); without, it uses MLX's global random state.
    """
    _check(temp, top_p, top_k, min_p)
    top_k = int(top_k)
    if temp == 0 or top_k == 1:
        return greedy

    filters = []
    if top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    key = [mx.random.key(seed)] if seed is not None else None
    inv_temp = 1.0 / temp

    def sampler(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key is None:
            return mx.random.categorical(logprobs * inv_temp)
        # split lazily: no sync, so the decode loop can stay pipelined
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_logits_processors(repetition_penalty: Optional[float] = None,
                           repetition_context_size: int = 20,
                           logit_bias: Optional[Dict[int, float]] = None) -> List[LogitsProcessor]:
    """Processors applied to the raw logits before sampling (empty list when none is set).

    repetition_penalty > 1 makes recently seen tokens (the last `repetition_context_size`
    prompt + generated tokens) less likely; 1.0 or None disables it.
    logit_bias: {token id: value} added to those tokens' logits (OpenAI's; -100 all but bans one).
    """
    procs: List[LogitsProcessor] = [_bias(logit_bias)] if logit_bias else []
    if repetition_penalty is None or repetition_penalty == 1.0:
        return procs
    if repetition_penalty <= 0:
        raise ValueError(f"repetition penalty must be > 0, got {repetition_penalty}")
    if repetition_context_size < 1:
        raise ValueError(f"repetition context size must be >= 1, got {repetition_context_size}")
    penalty, n = float(repetition_penalty), int(repetition_context_size)

    def repetition(tokens: mx.array, logits: mx.array) -> mx.array:
        recent = tokens[-n:]
        if recent.size == 0:
            return logits
        seen = logits[:, recent]
        # sign-aware: shrink positive logits, push negative ones further down
        logits[:, recent] = mx.where(seen < 0, seen * penalty, seen / penalty)
        return logits

    return procs + [repetition]


def _bias(logit_bias: Dict[int, float]) -> LogitsProcessor:
    ids = mx.array([int(k) for k in logit_bias], dtype=mx.int32)
    values = mx.array([float(v) for v in logit_bias.values()], dtype=mx.float32)

    def bias(tokens: mx.array, logits: mx.array) -> mx.array:
        logits[:, ids] = logits[:, ids] + values
        return logits

    return bias
