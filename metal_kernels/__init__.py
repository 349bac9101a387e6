"""Custom kernels: Metal on Apple GPUs, the CUDA twin on NVIDIA, one definition for both.

The KDA kernels are launched from here; the MLA attention kernels from metal_kernels.mla
(mla_template.py), through the same `_kernel` factory. KDA:

    kda_prefill_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, initial_state=None)
        -> (o [B,T,H,V] in q_raw's dtype, state [B,H,K,V] fp32)   or None
    kda_decode_step_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, state,
                          o_norm_weight=None, gate=None, eps=1e-5, conv=None, low_rank=None)
        -> (o, state), with conv (o, state, conv state)   or None

Inputs are the raw projections: q_raw, k_raw [B,T,H,K] (after the short conv, before the L2
norm), f [B,T,H,K] (f_b(f_a(x)), before dt_bias and softplus), b_raw [B,T,H] (before the
sigmoid), v [B,T,H,V]; dt_bias has H*K values, A_log H values. The kernels compute the L2 norm
(and q * K^-1/2), g = -exp(A_log) softplus(f + dt_bias) and beta = sigmoid(b_raw) themselves.

None means "no kernel here": the caller runs the MLX-ops path. That happens on the CPU, when
KIMI_MLX_KDA=reference, or for shapes the kernels do not take (K not a multiple of 32, V not a
multiple of 16).
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import threading

from kimi_mlx.settings import kernel_setting, kernel_switch

from . import dialect as _dialect
from . import sources as _sources
from .kda_template import (DECODE_INPUTS, DECODE_OUTPUTS, PREFILL_INPUTS, prefill_outputs,
                           prefill_smem_floats, render, split_item_sizes)

__all__ = ["available", "backend", "kda_prefill_fused", "kda_decode_step_fused"]

_PREFILL_THREADS = 512  # bf16 / f16; fp32 builds use 256 (registers)
_CUDA_SMEM_LIMIT = 232448  # bytes of shared memory one block may take on sm_90 (227 KB)


def backend() -> str | None:
    """'metal', 'cuda' or None (no kernel: use the MLX-ops path)."""
    if kernel_switch("KIMI_MLX_KDA") == "reference":
        return None
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


def available() -> bool:
    return backend() is not None


# Info arrays are padded to INFO_MIN values (16 bytes): MLX-CUDA keeps arrays of 8 bytes or less in
# its scalar pool, managed memory that kernels read in place from the host (cudaMemAdviseSetAccessedBy),
# while larger ones move to the GPU on first use. An H100 profile of the MLA decode kernel had 13 % of
# its stall samples on one 4-byte scale from that pool, against 0.3 % on its 20-byte info ints.
INFO_MIN = 4


def _padded(vals) -> list:
    """vals, then zeros up to INFO_MIN values."""
    vals = list(vals)
    return vals + [0] * (INFO_MIN - len(vals))


def _info(vals, dtype):
    import mlx.core as mx

    a = mx.array(_padded(vals), dtype=dtype)
    mx.eval(a)
    return a


@functools.lru_cache(maxsize=64)
def info_ints(*vals):
    """An int32 array of these values (zeros after them up to INFO_MIN), made once and kept: the
    small info inputs of kernel calls, which decode steps repeat."""
    import mlx.core as mx

    return _info(vals, mx.int32)


class StepInfo:
    """Info arrays for values that advance by a fixed step from one call to the next (a decode
    step's depth and cache row): views of rows of a table made once for RING calls, not a new
    host array each call. MLX-CUDA keeps host-made arrays in managed memory that migrates to the
    GPU on its first read, and a new info array every step cost about 0.24 ms a step there (H100,
    128K, an MLA decode evaluated alone: 498 us a step against 231 from a table). Each row equals
    the values asked for (checked on the host), so a guess that does not hold only costs a new table."""

    RING = 256
    TABLES = 4  # interleaved streams (sessions, batch sizes) each keep theirs

    def __init__(self):
        self._tables = []  # (first values, step, array [RING, len]), newest last
        self._seen = []  # the last calls' values, newest last (to learn a step from)
        self._last = (None, None)
        self._lock = threading.Lock()

    def __call__(self, *vals):
        vals = tuple(int(v) for v in vals)
        with self._lock:
            if self._last[0] == vals:  # the other layers of the same step
                return self._last[1]
            a = self._find(vals)
            if a is None:
                a = self._new_table(vals)
            self._seen = [v for v in self._seen if v != vals][-7:] + [vals]
            self._last = (vals, a)
            return a

    def _find(self, vals):
        for t in reversed(self._tables):
            base, step, table = t
            if len(base) != len(vals):
                continue
            d = [v - b for v, b in zip(vals, base)]
            i = next((i for i, u in enumerate(step) if u), None)
            j = 0 if i is None else d[i] // step[i]
            if 0 <= j < table.shape[0] and all(x == j * u for x, u in zip(d, step)):
                self._tables.remove(t)
                self._tables.append(t)
                return table[j]
        return None

    def _new_table(self, vals):
        import mlx.core as mx

        # the step from the nearest earlier call: every value the same or one more
        step = (0,) * len(vals)
        for prev in reversed(self._seen):
            d = tuple(v - p for v, p in zip(vals, prev))
            if len(prev) == len(vals) and any(d) and all(x in (0, 1) for x in d):
                step = d
                break
        rows = self.RING if any(step) else 1
        table = mx.array([_padded(v + j * u for v, u in zip(vals, step)) for j in range(rows)], dtype=mx.int32)
        mx.eval(table)
        self._tables = self._tables[-(self.TABLES - 1):] + [(vals, step, table)]
        return table[0]


step_info = StepInfo()


@functools.lru_cache(maxsize=16)
def info_floats(*vals):
    """info_ints for float32 values (scales, eps)."""
    import mlx.core as mx

    return _info(vals, mx.float32)


@functools.lru_cache(maxsize=None)
def _kernel(be: str, kind: str, shared_memory: int = 0, prof: bool = False, max_threads: int = 0):
    """Built once per (backend, kind[, shared memory, ...]); MLX compiles per template instance."""
    import mlx.core as mx

    d = _dialect.DIALECTS[be]
    if kind.startswith(("mla_", "moe_")):
        header, body = _sources.render(d, kind)
        if be == "cuda" and max_threads:  # a register cap: MLX writes the signature
            blocks = 2 if max_threads <= 256 else 1  # two blocks of 256, or one larger
            header += ("#undef __global__\n"
                       f"#define __global__ __location__(global) __launch_bounds__({max_threads}, {blocks})\n")
        ins, outs = _sources.io_names(kind, d)
        name_kind = kind
    else:
        header, body = render(d, kind, prof, max_threads)
        ins = PREFILL_INPUTS if kind == "prefill" else DECODE_INPUTS
        outs = prefill_outputs(d, prof) if kind == "prefill" else DECODE_OUTPUTS
        name_kind = f"kda_{kind}"
    # the source hash in the name keeps MLX's on-disk PTX cache from serving an older build
    tag = hashlib.sha1((header + body).encode()).hexdigest()[:10]
    name = f"{name_kind}_{tag}"
    if be == "metal":
        return mx.fast.metal_kernel(name=name, input_names=ins, output_names=outs,
                                    source=body, header=header)
    return mx.fast.cuda_kernel(name=name, input_names=ins, output_names=outs, source=body,
                               header=header, shared_memory=shared_memory)


def _poison():
    """KIMI_MLX_KDA_POISON=1 fills outputs with NaN before the kernel (tests: unwritten elements show)."""
    return float("nan") if kernel_switch("KIMI_MLX_KDA_POISON", "off") != "off" else None


def _precisions(dtype, be: str, env: str | None) -> tuple[int, int]:
    """(intra-chunk, state) matrix precision. Metal multiplies fp32 fragments either way."""
    import mlx.core as mx

    if env:
        a, b = env.split(",")
        return int(a), int(b)
    if be == "metal" or dtype == mx.float32:
        return _dialect.PREC_TF32X3, _dialect.PREC_TF32X3
    return _dialect.PREC_BF16, _dialect.PREC_BF16


def _slice_width(be: str, B: int, H: int, K: int, V: int) -> int | None:
    """Columns of V per threadgroup: wide slices repeat less intra-chunk work, narrow ones give
    more threadgroups when B*H is small. KIMI_MLX_KDA_BV overrides."""
    env = kernel_setting("KIMI_MLX_KDA_BV")
    cands = [int(env)] if env else [64, 32, 16]
    ok = [bv for bv in cands if V % bv == 0 and bv <= 64 and
          (be == "metal" or 4 * prefill_smem_floats(K, bv) <= _CUDA_SMEM_LIMIT)]
    if not ok:
        return None
    if env:
        return ok[0]
    for bv in ok:  # widest slice that still gives ~one threadgroup per multiprocessor
        if B * H * (V // bv) >= 120:
            return bv
    return ok[-1]


_SPLIT_MAX_BYTES = 4 << 30  # scratch of one call (about 1 KB per token and head in bf16)


def _use_split(be: str, nslices: int, scratch_bytes: int) -> bool:
    """Share the intra-chunk work between the v-slice threadgroups of a head (SPLIT). On by
    default on CUDA; on Metal only with KIMI_MLX_KDA_SPLIT=1 until it is measured on a Mac
    (it needs device-scope atomics and fences, MSL 3.2). KIMI_MLX_KDA_SPLIT=0 turns it off.
    Calls whose scratch would pass 4 GiB (past ~128K tokens x 32 heads) run fused instead;
    the model prefills in steps of 2048 tokens, far below that."""
    env = kernel_switch("KIMI_MLX_KDA_SPLIT")
    on = env == "on" if env in ("on", "off") else be == "cuda"
    return on and nslices > 1 and scratch_bytes <= _SPLIT_MAX_BYTES


def _lookahead(nslices: int) -> int:
    """SPLIT: how many chunks ahead of its state pass a threadgroup may claim intra-chunk work
    (KIMI_MLX_KDA_LA overrides; tuning)."""
    return int(kernel_setting("KIMI_MLX_KDA_LA") or 2 * nslices)


_sync_calls = itertools.count(1)


def _sync_value() -> int:
    """The value one call's sync slots start at (mx.full writes every slot). It differs between
    calls so that mx.compile can never merge two calls' sync arrays into one."""
    return next(_sync_calls) % (1 << 30) + 1


@functools.lru_cache(maxsize=1)
def _dummy_sync():
    import mlx.core as mx

    a = mx.zeros((1,), mx.int32)
    mx.eval(a)
    return a


def kda_prefill_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, initial_state=None):
    return _prefill(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, initial_state)


def _prefill(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, initial_state=None, prof=False):
    """prof=True (CUDA, for tuning): also returns per-phase clock counts [threadgroups, 16]."""
    be = backend()
    if be is None:
        return None
    import mlx.core as mx

    B, T, H, K = q_raw.shape
    V = v.shape[-1]
    if K not in (32, 64, 128, 256) or V % 16:
        return None
    bv = _slice_width(be, B, H, K, V)
    if bv is None:
        return None
    dt = q_raw.dtype
    k_raw, v, f, b_raw = (x.astype(dt) for x in (k_raw, v, f, b_raw))
    dt_bias = dt_bias.reshape(-1).astype(mx.float32)
    A_log = A_log.reshape(-1).astype(mx.float32)
    has_init = initial_state is not None
    init = initial_state.astype(mx.float32) if has_init else mx.zeros((1,), mx.float32)
    if T == 0:
        S = init if has_init else mx.zeros((B, H, K, V), mx.float32)
        return mx.zeros((B, 0, H, V), dt), S
    smem = prefill_smem_floats(K, bv)
    pi, ps = _precisions(dt, be, kernel_setting("KIMI_MLX_KDA_PREC"))
    nt = int(kernel_setting("KIMI_MLX_KDA_NT") or _PREFILL_THREADS)
    if dt == mx.float32 and be == "cuda":
        nt = 256  # the fp32 (3xtf32) build needs more than 128 registers per thread
    nt = min(nt, 64 * K // 8)  # the chunk load gives each thread at least one row of 8 channels
    nch = -(-T // 64)
    ts = mx.bfloat16 if ps == _dialect.PREC_BF16 and be == "cuda" else mx.float32
    xs_item, xf_item = split_item_sizes(K)
    split = _use_split(be, V // bv, B * H * nch * xs_item * ts.size)
    # prefetch a chunk ahead where registers allow it (256 threads; not with SPLIT)
    pf = not split and kernel_switch("KIMI_MLX_KDA_PF", "on" if nt <= 256 else "off") == "on"
    kern = _kernel(be, "prefill", 0 if be == "metal" else 4 * smem, prof, nt if be == "cuda" else 0)
    ntg = B * H * (V // bv)
    if split:
        shapes = [(B, T, H, V), (B, H, K, V), (B * H * nch * xs_item,), (B * H * nch * xf_item,)]
        sync = mx.full((B * H * (nch + 1) + 1,), _sync_value(), mx.int32)
    else:
        shapes = [(B, T, H, V), (B, H, K, V), (1,), (1,)]
        sync = _dummy_sync()
    dtypes = [dt, mx.float32, ts, mx.float32]
    if be == "metal":
        shapes.append((ntg * smem,))
        dtypes.append(mx.float32)
    if prof:
        shapes.append((ntg, 16))
        dtypes.append(mx.float32)
    outs = kern(
        inputs=[q_raw, k_raw, v, f, b_raw, dt_bias, A_log, init, sync],
        template=[("T", dt), ("K", K), ("V", V), ("BV", bv), ("NT", nt),
                  ("HAS_INIT", has_init), ("PI", pi), ("PS", ps), ("PF", pf),
                  ("SPLIT", split), ("TS", ts), ("LA", _lookahead(V // bv)), ("SMEM_FLOATS", smem)],
        grid=(nt * (V // bv), H, B),
        threadgroup=(nt, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        init_value=_poison(),
    )
    if prof:
        return outs[0], outs[1], outs[-1]
    return outs[0], outs[1]


@functools.lru_cache(maxsize=16)
def _decode_consts(dt, eps: float):
    """Per-call constants made once: the eps array and the 1-element dummies."""
    import mlx.core as mx

    c = (info_floats(eps), mx.zeros((1,), dt))
    mx.eval(*c)
    return c


def kda_decode_step_fused(q_raw, k_raw, v, f, dt_bias, A_log, b_raw, state,
                          o_norm_weight=None, gate=None, eps=1e-5, conv=None, low_rank=None):
    """One token. q_raw, k_raw, f [B,1,H,K] or [B,H,K]; v [B,(1,)H,V]; b_raw [B,(1,)H];
    state [B,H,K,V] fp32 or None. With o_norm_weight [V] and gate [B,(1,)H,V] (raw logits),
    o is RMSNorm(o) * o_norm_weight * sigmoid(gate), fused. Returns (o shaped like v, state).
    conv = (conv_state [B, KC-1, C], conv_w [C, KC]): the kernel runs the short convs (silu'd)
    too. q_raw is then the token's projections before them, [B,(1,)C] = [q | k | v], k_raw and
    v are None, and it returns (o [B,(1,)H,V], state, new conv state).
    low_rank = (f_w [H*K, K], g_w [H*V, K]), with the gated norm: f and gate are the first
    low-rank projections f_a, g_a [B,(1,)K], and the kernel multiplies them by f_w and g_w."""
    be = backend()
    if be is None:
        return None
    import mlx.core as mx

    H = A_log.size
    K = dt_bias.size // H
    lead = b_raw.shape[:-1]
    B = b_raw.size // H
    dt = q_raw.dtype
    eps_arr, dummy = _decode_consts(dt, float(eps))
    gated = o_norm_weight is not None and gate is not None
    if conv is not None:
        conv_state, conv_w = conv
        C, kc = conv_w.shape
        V = (C - 2 * H * K) // H
        if kc < 2 or conv_state.shape != (B, kc - 1, C) or q_raw.size != B * C or H * V + 2 * H * K != C:
            return None
        q_raw = q_raw.reshape(B, C)
        k_raw = v = dummy
        conv_state, conv_w = conv_state.astype(dt), conv_w.astype(dt)
    else:
        kc = 0
        V = v.shape[-1]
        q_raw = q_raw.reshape(B, H, K)
        k_raw = k_raw.astype(dt).reshape(B, H, K)
        v = v.astype(dt).reshape(B, H, V)
        conv_state = conv_w = dummy
    if K % 32 or V % 32:
        return None
    if low_rank is not None:
        f_w, g_w = low_rank
        if not gated or f_w.shape != (H * K, K) or g_w.shape != (H * V, K) or f.size != B * K or gate.size != B * K:
            return None
        f, gate = f.astype(dt).reshape(B, K), gate.astype(dt).reshape(B, K)
        f_w, g_w = f_w.astype(dt), g_w.astype(dt)
    else:
        f = f.astype(dt).reshape(B, H, K)
        f_w = g_w = dummy
        if gated:
            gate = gate.astype(dt).reshape(B, H, V)
    b_raw = b_raw.astype(dt).reshape(B, H)
    dt_bias = dt_bias.reshape(-1).astype(mx.float32)
    A_log = A_log.reshape(-1).astype(mx.float32)
    S = mx.zeros((B, H, K, V), mx.float32) if state is None else state.astype(mx.float32)
    if gated:
        bvd, rg = V, 4
        norm_w = o_norm_weight.reshape(-1).astype(dt)
    else:
        bvd, rg = 32, 4
        norm_w = gate = dummy
    while K % rg:
        rg //= 2
    ntd = bvd * rg
    kern = _kernel(be, "decode")
    o, S, conv_out = kern(
        inputs=[q_raw, k_raw, v, f, b_raw, dt_bias, A_log, S, norm_w, gate,
                eps_arr, conv_state, conv_w, f_w, g_w],
        template=[("T", dt), ("K", K), ("V", V), ("BVD", bvd), ("NTD", ntd), ("GATED", gated), ("KC", kc),
                  ("LR", low_rank is not None)],
        grid=(ntd * (V // bvd), H, B),
        threadgroup=(ntd, 1, 1),
        output_shapes=[(B, H, V), (B, H, K, V), (B, kc - 1, C) if kc else (1,)],
        output_dtypes=[dt, mx.float32, dt],
        init_value=_poison(),
    )
    o = o.reshape(*lead, H, V)
    return (o, S, conv_out) if kc else (o, S)
