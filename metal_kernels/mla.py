"""Launch code of the MLA attention kernels (mla_template.py). Every function returns None
when there is no kernel for the call (CPU, KIMI_MLX_MLA=reference, shapes the kernels don't
take); the caller then runs the plain MLX-ops path in kimi_mlx/ops/attention.py.

    mla_decode_partial(q, seg, n, key_start, q_offset, heads, scale, d_v)
        -> (o_part [B, NS, M, d_v] fp32, lse_part [B, NS, M] fp32)
    mla_combine(parts, dtype) -> o [B, M, d_v]
    mla_prefill_block(q, kv, rows, n, key_start, q_offset, scale, d_v, d_rope, init=None)
        -> (o [B, T, H, d_v] fp32, lse [B, H, T] fp32)
"""
from __future__ import annotations

import functools
from typing import NamedTuple

from kimi_mlx.settings import kernel_setting, kernel_switch

from . import dialect as _dialect
from . import info_floats, info_ints
from .mla_template import MAX_SPLITS, decode_smem_floats, prefill_smem_floats

_CUDA_SMEM_LIMIT = 232448  # one threadgroup's dynamic shared memory (sm_90)
_CUDA_SM_SMEM = 233472  # a multiprocessor's, 1 KB of it reserved per threadgroup
_MIN_KEYS_PER_SPLIT = 128


def backend() -> str | None:
    """The kernels' backend ('metal' / 'cuda'), or None: KIMI_MLX_MLA=reference forces the plain path."""
    if kernel_switch("KIMI_MLX_MLA") == "reference":
        return None
    from . import backend as _be

    return _be()


def _kernel(be, kind, smem_bytes=0, max_threads=0):
    from . import _kernel as k  # looked up per call: tests swap in the emulator

    return k(be, kind, smem_bytes, False, max_threads)


def _tiles(be: str, dt):
    """(tile element type, product precision): bf16 tiles and products on CUDA for bf16,
    fp32 tiles (3xtf32 products) otherwise; Metal multiplies fp32 fragments."""
    import mlx.core as mx

    if be == "cuda" and dt == mx.bfloat16:
        return mx.bfloat16, _dialect.PREC_BF16
    return mx.float32, (_dialect.PREC_TF32X3 if be == "cuda" else _dialect.PREC_BF16)


def _kstep(be: str, prec: int) -> int:
    return 16 if be == "cuda" and prec == _dialect.PREC_BF16 else 8


@functools.lru_cache(maxsize=4)
def _dummy(dt_name: str):
    import mlx.core as mx

    a = mx.zeros((1, 1, 8), dtype=getattr(mx, dt_name))
    mx.eval(a)
    return a


def _nbuf(be: str, most: int, smem_bytes) -> int:
    """Tile buffers of a kernel: KIMI_MLX_MLA_NBUF (capped at `most`), else 2 on CUDA when the
    shape allows (`most`) and smem_bytes(2) fits, else 1 (Metal: no async copies to overlap)."""
    env = kernel_setting("KIMI_MLX_MLA_NBUF")
    if env:
        return max(1, min(most, int(env)))
    return 2 if be == "cuda" and most >= 2 and smem_bytes(2) <= _CUDA_SMEM_LIMIT else 1


def _choice(name: str, allowed: tuple) -> int | None:
    """A kernel setting that takes one of `allowed` ints; None when unset."""
    env = kernel_setting(name)
    if not env:
        return None
    if env not in [str(a) for a in allowed]:
        raise ValueError(f"{name} must be {' or '.join(map(str, allowed))}, not {env}")
    return int(env)


def _decode_bk(be: str, most_bufs: int, smem_bytes) -> int:
    """Keys a decode tile: KIMI_MLX_MLA_DECODE_BK, else 64 on CUDA where two such tiles stream
    (_nbuf gives them two buffers and smem_bytes(nbuf, 64) fits; H100 at 128K: 169 us a call
    against 193 with 32; with one buffer 64 was slower, 226 against 207), else 32."""
    bk = _choice("KIMI_MLX_MLA_DECODE_BK", (32, 64))
    if bk:
        return bk
    two = _nbuf(be, most_bufs, lambda nb: smem_bytes(nb, 64)) == 2
    return 64 if be == "cuda" and two and smem_bytes(2, 64) <= _CUDA_SMEM_LIMIT else 32


def _decode_warps(groups: int) -> int:
    """Warps a decode warp group: KIMI_MLX_MLA_DECODE_NW (16: one group only, each warp on half of a
    tile's keys in S), else 8."""
    nw = _choice("KIMI_MLX_MLA_DECODE_NW", (8, 16)) or 8
    return nw if groups == 1 else 8


def _decode_groups(be: str) -> int:
    """Warp groups of a decode threadgroup: KIMI_MLX_MLA_DECODE_GROUPS (2 on CUDA only: named
    barriers), else 1."""
    g = _choice("KIMI_MLX_MLA_DECODE_GROUPS", (1, 2)) or 1
    return g if be == "cuda" else 1


def _prefill_rw(be: str, smem_bytes) -> int:
    """16-row query tiles a prefill warp: KIMI_MLX_MLA_PREFILL_RW, else 2 on CUDA where the tiles
    fit (bf16; H100, full causal 32K / 128K: 221 / 234 TFLOP/s against 179 / 184 with 1), else 1."""
    rw = _choice("KIMI_MLX_MLA_PREFILL_RW", (1, 2))
    if rw:
        return rw
    return 2 if be == "cuda" and smem_bytes(2) <= _CUDA_SMEM_LIMIT else 1


def _target_threadgroups(be: str, per_sm: int = 2) -> int:
    """One wave of threadgroups: per_sm on each multiprocessor (H100/H200: 132)."""
    env = kernel_setting("KIMI_MLX_MLA_TGS")
    return int(env) if env else (132 * per_sm if be == "cuda" else 80)


def _keys_per_split(be: str, n: int, row_blocks: int, max_splits: int, per_sm: int = 2) -> int:
    """Keys per split: enough splits to fill the GPU, no fewer than _MIN_KEYS_PER_SPLIT keys
    each (every split loads the query tile), at most max_splits (one combine takes them all)."""
    ns = max(1, -(-_target_threadgroups(be, per_sm) // max(1, row_blocks)))
    kps = max(_MIN_KEYS_PER_SPLIT, -(-n // ns), -(-n // max(1, max_splits)))
    return -(-kps // 32) * 32


def mla_decode_partial(q, seg, n: int, key_start: int, q_offset: int, heads: int, scale: float,
                       d_v: int, max_splits: int = MAX_SPLITS):
    """Absorbed attention of query rows q [B, M, D] (row r = token r // heads, head r % heads,
    the token at absolute position q_offset + r // heads) over the first n rows of one cache
    segment: seg is rows [B, cap, D] or {"wq", "scales", "biases"} (8-bit, groups along D)."""
    B, M, D = q.shape
    plan = mla_decode_launch(seg, B, M, D, d_v, n, max_splits)
    if plan is None:
        return None
    launch, kps = plan
    return mla_decode_run(launch, q, seg, info_ints(n, key_start, q_offset, heads, kps), scale)


class DecodeLaunch(NamedTuple):
    be: str
    dt: object
    q8: bool
    nt: int
    g: int
    two: bool
    smem: int
    template: tuple
    ns: int  # splits
    B: int
    M: int
    d_v: int


def mla_decode_launch(seg, B: int, M: int, D: int, d_v: int, n: int, max_splits: int = MAX_SPLITS):
    """The host side of a decode launch over the first n rows of seg: (launch, keys per split), or
    None when no kernel takes it. `launch` is hashable and fixes the kernel call (grid, shapes,
    template) but not the depth, which the info array carries (n, key_start, q_offset, heads,
    keys per split): a launch made for n serves any depth with the same split count."""
    be = backend()
    if be is None or n <= 0:
        return None
    q8 = isinstance(seg, dict)
    dt = seg["scales"].dtype if q8 else seg.dtype
    if q8:
        dq = seg["wq"].shape[2] * 4
        qg = dq // seg["scales"].shape[2]
    else:
        dq, qg = D, 64
    plan = _decode_plan(be, dt, q8, D, d_v, dq, qg, *(kernel_setting(k) for k in _DECODE_SETTINGS))
    if plan is None:
        return None
    nt, g, two, smem, template = plan
    row_blocks = -(-M // 32) * B
    kps = _keys_per_split(be, n, row_blocks, max_splits, 2 if two else 1)
    ns = -(-n // kps)
    ns = -(-ns // g) * g  # a multiple of the groups (an empty last split writes lse -inf)
    return DecodeLaunch(be, dt, q8, nt, g, two, smem, template, ns, B, M, d_v), kps


def mla_decode_run(launch, q, seg, info, scale: float):
    """The kernel call of a launch (mla_decode_launch) for q [B, M, D] over seg, with info the
    int32 array (n, key_start, q_offset, heads, keys per split): (o_part, lse_part). Takes arrays
    only besides the launch, so it runs inside mx.compile."""
    import mlx.core as mx

    be, dt, q8, nt, g, two, smem, template, ns, B, M, d_v = launch
    # a register cap where more than 256 threads share a multiprocessor (_kernel)
    kern = _kernel(be, "mla_decode", 0 if be == "metal" else 4 * smem, nt if two or nt > 256 else 0)
    dummy = _dummy(str(dt).split(".")[-1])
    rows, wq, sc, bi = (dummy, seg["wq"], seg["scales"], seg["biases"]) if q8 else (seg, _dummy("uint32"), dummy, dummy)
    shapes = [(B, ns, M, d_v), (B, ns, M)]
    dtypes = [mx.float32, mx.float32]
    if be == "metal":
        shapes.append((ns * -(-M // 32) * B * smem,))
        dtypes.append(mx.float32)
    outs = kern(
        inputs=[q.astype(dt), rows, wq, sc, bi, info, info_floats(scale)],
        template=list(template),
        grid=(nt * (ns // g), -(-M // 32), B),
        threadgroup=(nt, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        init_value=None,
    )
    return outs[0], outs[1]


def combine_fits(splits: int, d_v: int) -> bool:
    """One combine takes `splits` partials of width d_v."""
    return splits <= MAX_SPLITS and d_v % 4 == 0


# the settings a decode launch plan depends on (read every call, or once a forward pass: held_kernel_settings)
_DECODE_SETTINGS = ("KIMI_MLX_MLA_NBUF", "KIMI_MLX_MLA_DECODE_BK", "KIMI_MLX_MLA_DECODE_GROUPS",
                    "KIMI_MLX_MLA_DECODE_NW", "KIMI_MLX_MLA_DECODE_BULK")


@functools.lru_cache(maxsize=64)
def _decode_plan(be: str, dt, q8: bool, D: int, d_v: int, dq: int, qg: int, *settings):
    """What a decode launch needs besides the depth, made once per kind of call (a decode step
    launches this for every segment of every MLA layer): (threads, warp groups, two
    threadgroups a multiprocessor, tile floats, template), or None when no kernel takes it.
    settings: the values of _DECODE_SETTINGS, which the helpers below read themselves."""
    st, prec = _tiles(be, dt)
    if D % _kstep(be, prec) or d_v % 8 or d_v > D or (q8 and (qg % 8 or dq < D)):
        return None
    # two key tiles where async copies exist and the tile holds the rows as stored (bf16 on CUDA)
    most = 1 if q8 or st != dt else 2
    g = _decode_groups(be)
    # query fragments in registers: bf16 products on CUDA, one warp group (two take a 128-register cap)
    qreg = be == "cuda" and prec == _dialect.PREC_BF16 and g == 1
    smem_bytes = lambda nb, b: 4 * decode_smem_floats(D, st.size, nb, b, g, qreg)  # noqa: E731
    bk = _decode_bk(be, most, smem_bytes)
    nbuf = _nbuf(be, most, lambda nb: smem_bytes(nb, bk))
    # key tiles by bulk copies: CUDA, two buffers of rows as stored, one group, when asked for
    bulk = (be == "cuda" and most == 2 and nbuf == 2 and g == 1
            and _choice("KIMI_MLX_MLA_DECODE_BULK", (0, 1)) == 1)
    smem = decode_smem_floats(D, st.size, nbuf, bk, g, qreg, bulk)
    if be == "cuda" and 4 * smem > _CUDA_SMEM_LIMIT:
        return None
    nw = _decode_warps(g)
    nt = 32 * nw * g
    # two 8-warp groups a multiprocessor: two threadgroups where their tiles fit beside each other,
    # or one of two groups; either way a register cap (_kernel: 128 registers a thread)
    two = be == "cuda" and (g > 1 or 2 * (4 * smem + 1024) <= _CUDA_SM_SMEM)
    template = (("T", dt), ("ST", st), ("PR", prec), ("D", D), ("DV", d_v), ("NW", nw), ("BK", bk),
                ("Q8", q8), ("QG", qg), ("DQ", dq), ("NBUF", nbuf), ("G", g), ("QREG", qreg), ("BULK", bulk),
                ("SMEM_FLOATS", smem))
    return nt, g, two, smem, template


def mla_combine(parts, dtype):
    """Merge split partials [(o_part [B, NS_i, M, DV], lse_part [B, NS_i, M]), ...] into
    o [B, M, DV] of `dtype`. The last segment's partials (a decode step's tail) are read where
    they are; only those of more than two segments are concatenated first."""
    be = backend()
    if be is None:
        return None
    import mlx.core as mx

    two = len(parts) > 1
    head = parts[:-1] if two else parts
    o = mx.concatenate([p[0] for p in head], axis=1) if len(head) > 1 else head[0][0]
    lse = mx.concatenate([p[1] for p in head], axis=1) if len(head) > 1 else head[0][1]
    o2, lse2 = parts[-1] if two else (_dummy("float32"), _dummy("float32"))
    B, NS, M, DV = o.shape
    if not combine_fits(NS + (o2.shape[1] if two else 0), DV):
        return None
    ntc, cw = 256, 64
    kern = _kernel(be, "mla_combine")
    return kern(inputs=[o, lse, o2, lse2], template=[("T", dtype), ("DV", DV), ("NTC", ntc), ("CW", cw), ("TWO", two)],
                grid=(ntc * -(-DV // cw), M, B), threadgroup=(ntc, 1, 1), output_shapes=[(B, M, DV)],
                output_dtypes=[dtype], init_value=None)[0]


def mla_prefill_block(q, kv, rows, n: int, key_start: int, q_offset: int, scale: float, d_v: int,
                      d_rope: int, init=None):
    """Expanded causal attention of q [B, T, H, NOPE + DR] (query t at absolute position
    q_offset + t) over n keys at absolute positions key_start..: per-head kv [B, n, H, NOPE + DV]
    (kv_b_proj of the latents) and the shared k_pe, the last DR columns of rows [B, n, D].
    init: (o, lse) of the keys before these, to continue from."""
    be = backend()
    if be is None:
        return None
    import mlx.core as mx

    B, T, H, DK = q.shape
    nope = DK - d_rope
    D = rows.shape[-1]
    dt = kv.dtype
    st, prec = _tiles(be, dt)
    ks = _kstep(be, prec)
    if DK % ks or nope % 8 or d_rope % 8 or d_v % 8 or kv.shape[-1] != nope + d_v or D % 8:
        return None
    nw = int(kernel_setting("KIMI_MLX_MLA_PREFILL_NW") or (8 if be == "cuda" else 4))
    rw = _prefill_rw(be, lambda r: 4 * prefill_smem_floats(DK, d_v, nw, st.size, 2 if be == "cuda" else 1, r))
    qreg = be == "cuda" and prec == _dialect.PREC_BF16 and rw == 1
    # two tile buffers where async copies exist and they fit (bf16: 137 KB; fp32 doesn't)
    nbuf = _nbuf(be, 2, lambda nb: 4 * prefill_smem_floats(DK, d_v, nw, st.size, nb, rw))
    smem = prefill_smem_floats(DK, d_v, nw, st.size, nbuf, rw)
    if be == "cuda" and 4 * smem > _CUDA_SMEM_LIMIT:
        return None
    nt = 32 * nw
    nqb = -(-T // (16 * rw * nw))
    has_init = init is not None
    o_in, lse_in = init if has_init else (_dummy("float32"), _dummy("float32"))
    kern = _kernel(be, "mla_prefill", 0 if be == "metal" else 4 * smem)
    shapes = [(B, T, H, d_v), (B, H, T)]
    dtypes = [mx.float32, mx.float32]
    if be == "metal":
        shapes.append((nqb * H * B * smem,))
        dtypes.append(mx.float32)
    outs = kern(
        inputs=[q.astype(dt), kv, rows.astype(dt), o_in, lse_in, info_ints(n, key_start, q_offset),
                info_floats(scale)],
        template=[("T", dt), ("ST", st), ("PR", prec), ("NOPE", nope), ("DR", d_rope), ("DV", d_v),
                  ("DL", D - d_rope), ("D", D), ("NW", nw), ("RW", rw), ("HAS_INIT", has_init), ("QREG", qreg),
                  ("NBUF", nbuf), ("SMEM_FLOATS", smem)],
        grid=(nt * H, nqb, B),
        threadgroup=(nt, 1, 1),
        output_shapes=shapes,
        output_dtypes=dtypes,
        init_value=None,
    )
    return outs[0], outs[1]
