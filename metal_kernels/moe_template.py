"""The MoE router as one kernel, written once for Metal and CUDA (the dialect layer of the other
kernels): what kimi_mlx.model.moe.route computes without group limiting, in one launch instead of
six (sigmoid, bias add, argpartition, take_along_axis, sum, divide and scale).

One threadgroup a row (token). Thread t holds the choices sigmoid(logit) + bias of experts
t, t + NT, ... in registers. Each of the K rounds is a threadgroup argmax over the experts not yet
picked: the thread's own best, a butterfly over the warp's lanes, then each warp's winner through
tile memory (two buffers used in turn, so one barrier a round). A larger choice wins, an equal one
goes to the lower expert: the picks come out in descending choice, ties in ascending expert order.
Lane r of warp 0 keeps pick r; warp 0 then reads the picks' scores (the same sigmoid again, so the
same values), renormalises and scales them.

Expert indices travel as floats (exact below 2^24): the lane exchanges then carry one type, which
the Metal emulator's simd_shuffle_xor takes.
"""
from __future__ import annotations

from .dialect import Dialect

MOE_HEADER = r"""
// sigmoid with the accurate exp, as MLX's own sigmoid, so that near-equal choices rank alike
DFN float moe_sigmoid(float x) { return 1.0f / (1.0f + MOE_EXP(-x)); }
// (v, i) ranks before (bv, bi): a larger choice, or an equal one at a lower expert (a NaN never does)
DFN bool moe_before(float v, float i, float bv, float bi) { return v > bv || (v == bv && i < bi); }
"""

# Template: E (experts, <= 1024), K (picks, <= 32 and <= E), NT (threads a row, a multiple of 32),
# RENORM (divide the picked scores by their sum), WT (the weights' type), SH (1: one more pick
# after the K, expert E with weight 1: a shared expert stacked after the routed ones; K + SH <= 32),
# DUP (each row's KO = K + SH indices, then the same again plus E + SH: the gate and up halves of
# experts stacked [gate of E + SH | up of E + SH]).
# Inputs: logits [N, E] fp32 (row contiguous), bias [E] fp32, info_f [scaling] fp32.
# Outputs: inds [N, KO * (DUP + 1)] uint32, weights [N, KO] WT, in descending choice, the shared
# expert last. Grid: (NT * N, 1, 1).
ROUTE_BODY = r"""
/*@PROLOGUE@*/
  constexpr int NW = NT / 32, EPT = (E + NT - 1) / NT;
  static_assert(NT % 32 == 0 && NT <= 1024 && EPT <= 32 && K >= 1 && K <= 32 && K <= E, "moe route shape");
  SHARED_ARR(float, s_v, 2 * NW);
  SHARED_ARR(float, s_i, 2 * NW);
  const long row = _gx;
  float ch[EPT];
  unsigned int taken = 0u;  // bit j: expert _tid + j * NT is picked (or past E)
  PRAGMA_UNROLL
  for (int j = 0; j < EPT; ++j) {
    const int e = _tid + j * NT;
    if (e < E) {
      ch[j] = moe_sigmoid(logits[row * E + e]) + bias[e];
    } else {
      ch[j] = MOE_NEG_INF;
      taken |= 1u << j;
    }
  }
  float pick = 0.0f;  // lane r: the expert of round r
  for (int r = 0; r < K; ++r) {
    float bv = MOE_NEG_INF, bi = (float)E;  // E: no expert yet
    PRAGMA_UNROLL
    for (int j = 0; j < EPT; ++j) {
      const float i = (float)(_tid + j * NT);
      if (!((taken >> j) & 1u) && moe_before(ch[j], i, bv, bi)) {
        bv = ch[j];
        bi = i;
      }
    }
    PRAGMA_UNROLL
    for (int m = 16; m >= 1; m >>= 1) {
      const float ov = SHFL_XOR(bv, m), oi = SHFL_XOR(bi, m);
      if (moe_before(ov, oi, bv, bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (NW > 1) {
      const int buf = (r & 1) * NW;  // round r + 2 writes here only after every thread passed round r + 1's barrier
      if (_lane == 0) {
        s_v[buf + _warp] = bv;
        s_i[buf + _warp] = bi;
      }
      BARRIER();
      for (int w = 0; w < NW; ++w) {
        const float ov = s_v[buf + w], oi = s_i[buf + w];
        if (moe_before(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
    }
    const int win = (int)bi;
    if (win < E && win % NT == _tid) taken |= 1u << (win / NT);
    if (_lane == r) pick = bi;
  }
  if (_warp == 0) {
    constexpr int KO = K + SH, IW = KO * (DUP + 1);
    static_assert(KO <= 32, "moe route picks");
    // a routed pick is E only when fewer than K choices could be ranked (NaN): clamped to E - 1
    const int e = _lane < K ? min((int)pick, E - 1) : E;
    const float s = _lane < K ? moe_sigmoid(logits[row * E + e]) : 0.0f;
    const float den = RENORM ? WARP_SUM(s) + 1e-20f : 1.0f;
    if (_lane < KO) {
      inds[row * IW + _lane] = (unsigned int)e;
      if (DUP) inds[row * IW + KO + _lane] = (unsigned int)(e + E + SH);
      weights[row * KO + _lane] = static_cast<WT>(_lane < K ? (RENORM ? s / den : s) * info_f[0] : 1.0f);
    }
  }
"""

ROUTE_INPUTS = ["logits", "bias", "info_f"]
ROUTE_OUTPUTS = ["inds", "weights"]

MAX_EXPERTS = 1024
MAX_TOP_K = 32


def inputs(kind: str) -> list[str]:
    if kind != "moe_route":
        raise ValueError(kind)
    return ROUTE_INPUTS


def outputs(kind: str, dialect: Dialect) -> list[str]:
    if kind != "moe_route":
        raise ValueError(kind)
    return ROUTE_OUTPUTS


def threads(E: int) -> int:
    """Threads a row: one an expert up to 256 (whole warps), then up to 4 experts a thread."""
    return min(256, -(-E // 32) * 32)


def render(dialect: Dialect, kind: str) -> tuple[str, str]:
    """(header, body) of 'moe_route' in `dialect`."""
    if kind != "moe_route":
        raise ValueError(kind)
    header = dialect.header + _DIALECT_EXTRA[dialect.name] + MOE_HEADER
    return header, ROUTE_BODY.replace("/*@PROLOGUE@*/", dialect.prologue)


_DIALECT_EXTRA = {
    "metal": r"""
#define MOE_EXP(x) metal::precise::exp(x)
#define MOE_NEG_INF (-INFINITY)
""",
    "cuda": r"""
#define MOE_EXP(x) expf(x)
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#define MOE_NEG_INF (-INFINITY)
""",
}
