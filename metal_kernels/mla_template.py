"""The MLA attention kernels, written once for Metal and CUDA (the dialect layer of the KDA
kernels: only dialect.py differs between the two).

NoPE MLA caches one row per token, [latent (DL) | k_pe (DR)], shared by every head. Two kernels:

decode (absorbed form, split-K flash-decoding). Query rows are (token, head) pairs: the
  absorbed query [W_uk^T q_nope | q_pe] of width D = DL + DR against the cached rows, values =
  the latent part (DV = DL). A threadgroup takes 32 query rows and one split of the keys, so
  the cache is read once per 32 rows (all heads of a token at once). Scores go through tile
  memory: each warp multiplies one 16-row block by a quarter of the row width (its query
  fragments stay in registers on CUDA), the softmax adds the four quarters, then the warps split
  the output columns of P V over all 32 rows, so each value fragment is read once. Each split
  writes its normalised partial output and log-sum-exp; `combine` merges the splits (of every
  cache segment) into the output.

prefill (expanded form, flash attention). Per-head keys [k_nope | k_pe] (width NOPE + DR) and
  values (DV) expanded from the cache by kv_b_proj; a threadgroup takes BQ = 16 * NW queries of
  one head, each warp 16 query rows with its scores, softmax and output in registers (FA2), the
  key/value tiles in tile memory. It can start from an earlier partial (o, lse) so that a long
  cache is attended block by block, each block expanded once.

Every kernel is causal at an offset: query t of the chunk sits at absolute position
q_offset + t and sees keys at absolute positions <= q_offset + t; the keys of a call are the
absolute positions key_start .. key_start + n - 1.
"""
from __future__ import annotations

from .dialect import Dialect

# Tile memory is addressed in floats; ST (the tile element type: float, or bf16 on CUDA) arrays
# take ceil(n * sizeof(ST) / 4) floats.
MLA_HEADER = r"""
#ifndef MLA_NEG_INF
#define MLA_NEG_INF (-INFINITY)
#endif
#define MLA_MAX_SPLITS 1024
#define MLA_LOG2E 1.4426950408889634f
#define MLA_LN2 0.6931471805599453f
template <typename ST> DFN int mla_floats(int n) { return (n * (int)sizeof(ST) + 3) / 4; }

// 8 consecutive values of a cached row at column d (a multiple of 8): plain, or 8-bit affine
// (mx.quantize layout: 4 values per uint32, little end first; scale and bias per group).
template <bool Q8, int QG, int DQ, typename T, typename PT, typename PQ, typename PS>
DFN void mla_row8(TH float* x, PT rows, PQ wq, PS scales, PS biases, long row, int d) {
  if (Q8) {
    const unsigned int w0 = wq[row * (DQ / 4) + d / 4], w1 = wq[row * (DQ / 4) + d / 4 + 1];
    const float s = static_cast<float>(scales[row * (DQ / QG) + d / QG]);
    const float b = static_cast<float>(biases[row * (DQ / QG) + d / QG]);
    PRAGMA_UNROLL
    for (int i = 0; i < 4; ++i) {
      x[i] = (float)((w0 >> (8 * i)) & 255u) * s + b;
      x[4 + i] = (float)((w1 >> (8 * i)) & 255u) * s + b;
    }
  } else {
    Raw8<T> r;
    ld8(r, rows + row * DQ + d);
    PRAGMA_UNROLL
    for (int i = 0; i < 8; ++i) x[i] = get8(r, i);
  }
}
// 8 consecutive values from src (zeros when !valid; src is then not read) into a tile as ST
template <typename ST, typename T, typename PD, typename PS>
DFN void mla_tile8(PD dst, PS src, bool valid) {
  float x[8];
  if (valid) {
    Raw8<T> raw;
    ld8(raw, src);
    PRAGMA_UNROLL
    for (int e = 0; e < 8; ++e) x[e] = get8(raw, e);
  } else {
    PRAGMA_UNROLL
    for (int e = 0; e < 8; ++e) x[e] = 0.0f;
  }
  st8<ST>(dst, x);
}
// 8 consecutive values src -> tile dst (zeros when !valid): asynchronously (cp.async; wait with
// ASYNC_WAIT*) when the tile holds the input's type and async copies exist, else at once (mla_tile8).
#if ASYNC_COPIES
template <typename ST, typename T> struct MlaCopy8 {
  static DFN void run(ST* dst, const T* src, bool valid) { mla_tile8<ST, T>(dst, src, valid); }
};
template <typename T> struct MlaCopy8<T, T> {
  static DFN void run(T* dst, const T* src, bool valid) {
    PRAGMA_UNROLL
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) ASYNC_COPY16(dst + i * (16 / sizeof(T)), src + i * (16 / sizeof(T)), valid);
  }
};
template <typename ST, typename T, typename PD, typename PS>
DFN void mla_copy8(PD dst, PS src, bool valid) { MlaCopy8<ST, T>::run(dst, src, valid); }
#else
template <typename ST, typename T, typename PD, typename PS>
DFN void mla_copy8(PD dst, PS src, bool valid) { mla_tile8<ST, T>(dst, src, valid); }
#endif
// This thread's 8-column chunk down a tile: rows r, r + RS, ... (< BK) into dst (row pitch ldd)
// from `first` (key k0, which exists; kstep elements between keys), zeros from row `left` on. The tile
// loaders below give each thread one chunk, so every step is a constant.
template <typename ST, typename T, int BK, int RS, typename PD, typename PS>
DFN void mla_chunk_rows(PD dst, int ldd, PS first, int kstep, int r, int left) {
  if (left + r >= BK) {  // a whole tile (the common case): two pointers stepped, no predicates
    PS src = first + r * kstep;
    PD d = dst;
    const long sstep = (long)RS * kstep;
    const int dstep = RS * ldd;
    PRAGMA_UNROLL
    for (int p = 0; p < (BK + RS - 1) / RS; ++p, src += sstep, d += dstep)
      if (p * RS + r < BK) mla_copy8<ST, T>(d, src, true);
    return;
  }
  PRAGMA_UNROLL
  for (int p = 0; p < (BK + RS - 1) / RS; ++p) {
    if (p * RS + r < BK) {
      const bool ok = p * RS < left;
      mla_copy8<ST, T>(dst + p * RS * ldd, first + (ok ? (p * RS + r) * kstep : 0), ok);  // invalid rows read nothing
    }
  }
}
// One decode key tile: cached rows k0.. (< k_hi) into sK (zeros past k_hi), plain rows only
template <typename ST, typename T, int D, int DQ, int BK, int NT, typename PK, typename PT>
DFN void mla_decode_tile(PK sK, PT rows, long rbase, int k0, int k_hi, int tid) {
  constexpr int CH = D / 8, RS = NT / CH;
  static_assert(RS >= 1, "a decode tile row needs at most NT chunks");
  if (tid >= RS * CH) return;
  const int r = tid / CH, c = (tid - r * CH) * 8;
  mla_chunk_rows<ST, T, BK, RS>(sK + r * (D + 8) + c, D + 8, rows + (rbase + k0) * DQ + c, DQ, r, k_hi - k0 - r);
}
// The same tile by bulk copies (CUDA, sm_90): warp 0 copies each existing row (D elements, as
// stored) into its padded tile row and counts the bytes on `bar`; every thread zeroes the rows past
// k_hi. Wait with MBAR_WAIT on bar, then a barrier (for the zeros).
template <typename ST, int D, int DQ, int BK, int NT, typename PK, typename PT, typename PB>
DFN void mla_decode_tile_bulk(PK sK, PT rows, long rbase, int k0, int k_hi, int tid, PB bar) {
  const int nr = min(BK, k_hi - k0);
  if (tid < 32) {
    if (tid == 0) MBAR_EXPECT(bar, nr * D * (int)sizeof(ST));
    for (int r = tid; r < nr; r += 32) BULK_COPY(sK + r * (D + 8), rows + (rbase + k0 + r) * DQ, D * (int)sizeof(ST), bar);
  }
  float z[8];
  PRAGMA_UNROLL
  for (int e = 0; e < 8; ++e) z[e] = 0.0f;
  for (int i = tid; i < (BK - nr) * (D / 8); i += NT) st8<ST>(sK + (nr + i / (D / 8)) * (D + 8) + (i % (D / 8)) * 8, z);
}
// One prefill key/value tile: keys k0 (< n) .. of head h, [k_nope | k_pe] into sK, v into sV (zeros
// past n). Each thread keeps one 8-column chunk, so its source and tile row pitches are fixed.
template <typename ST, typename T, int NOPE, int DR, int DV, int D, int DL, int BKN, int NT, typename PK, typename PR_, typename PT>
DFN void mla_prefill_tile(PK sK, PK sV, PR_ kv, PT rows, int bb, int n, int Hn, int h, int k0, int tid) {
  constexpr int DK = NOPE + DR, LDK = DK + 8, LDV = DV + 8, CH = (DK + DV) / 8, RS = NT / CH;
  static_assert(RS >= 1, "a prefill tile row needs at most NT chunks");
  if (tid >= RS * CH) return;
  const int r = tid / CH, c = (tid - r * CH) * 8;
  const bool from_kv = c < NOPE || c >= DK;  // k_nope and v come from kv, k_pe from the cached rows
  const int kstep = from_kv ? Hn * (NOPE + DV) : D;  // elements from one key to the next
  const PT base = from_kv ? kv + (long)h * (NOPE + DV) + (c < NOPE ? c : c - DR) : rows + DL + (c - NOPE);
  mla_chunk_rows<ST, T, BKN, RS>(c < DK ? sK + r * LDK + c : sV + r * LDV + (c - DK), c < DK ? LDK : LDV,
                                 base + ((long)bb * n + k0) * (long)kstep, kstep, r, n - k0 - r);
}
"""

# Template: T (input dtype), ST (tile type), PR (product precision), D, DV, NW (warps a group: 8, or 16
# with one group: then each warp takes half of a tile's keys in S), BK
# (keys a tile: 32 or 64), Q8, QG (quantization group), DQ (row width as stored: D, or D padded to QG when Q8), NBUF (key
# tiles: 2 streams the next one in with async copies; plain rows only), G (warp groups: each works
# on its own split with its own key tiles and barriers, sharing the query tile; 2 needs named
# barriers, CUDA only), QREG (each warp keeps its query fragments in registers; the query tile is
# staged where the score tiles go), BULK (CUDA: key tiles by bulk copies counted on an mbarrier,
# not cp.async by every thread; two buffers, plain rows, one group).
# Inputs: q [B, M, D] (T); rows [B, cap, D] (T) or a 1-element dummy; wq [B, cap, DQ/4] uint32,
# scales, biases [B, cap, DQ/QG] (T) or dummies; info int32 [n, key_start, q_offset, H, kps].
# Outputs: o_part [B, NS, M, DV] fp32, lse_part [B, NS, M] fp32 (+ scratch on Metal), NS = G * threadgroups.
# Grid: (NS * 32 * NW, ceil(M / 32), B): NS / G threadgroups of G * 32 * NW threads; query row r is
# token r / H, head r % H.
DECODE_BODY = r"""
/*@PROLOGUE@*/
  constexpr int BM = 32, NT = 32 * NW, TPR = NT / BM, KPT = BK / TPR;  // softmax: threads a row, keys each
  constexpr int NCH = NW / 8, NST = BK / 8 / NCH;  // score column groups; a warp's column tiles
  constexpr int LDQ = D + 8, LDK = D + 8, LDS = BK + 8, LDP = BK + 8;  // (fp32 score rows of BK + 8: no bank conflicts)
  constexpr int NPW = 2 * ((DV / 8 + 2 * NW - 1) / (2 * NW));  // output column tiles a warp (pairs)
  constexpr bool FULLCT = DV / 8 == NW * NPW;  // every warp's every tile exists
  constexpr int NKS = D / KSTEP(PR), NKQ = (NKS + 3) / 4;  // contraction steps: all, a quarter's
  constexpr int S4 = 4 * BM * LDS;  // the four quarters' score tiles
  static_assert((NW == 8 || (NW == 16 && G == 1)) && (BK == 32 || BK == 64) && D % KSTEP(PR) == 0 && DV % 8 == 0 && DV <= D, "mla decode shape");
  static_assert(G == 1 || (G == 2 && NAMED_BARRIERS), "warp groups need named barriers");
/*@SMEM@*/
  static_assert(NBUF == 1 || !Q8, "async key tiles hold plain rows");
  static_assert(!BULK || (BULK_COPIES && NBUF == 2 && !Q8 && G == 1), "bulk key tiles: CUDA, two buffers, plain rows, one group");
  // the group's own thread and warp, as if it were the whole threadgroup
  const int grp = _warp / NW, gt = _tid - grp * NT, gw = _warp - grp * NW;
#define MLA_GBAR() do { if (G == 1) BARRIER(); else GROUP_BARRIER(1 + grp, NT); } while (0)
  // per group: score tiles (QREG: group 0's hold the query tile until it is in registers), key
  // tiles, P, row statistics; without QREG the query tile comes first and stays
  const int KF = mla_floats<ST>(BK * LDK), QF = mla_floats<ST>(BM * LDQ);
  const int SQF = QREG ? max(S4, QF) : S4;
  DEVP float* sS = smem + (QREG ? 0 : QF) + grp * (SQF + NBUF * KF + mla_floats<ST>(BM * LDP) + 3 * BM);
  DEVP ST* sQ = TILE_PTR(ST, smem, 0);
  DEVP float* sKb = sS + SQF;
  DEVP ST* sP = TILE_PTR(ST, sKb, NBUF * KF);
  DEVP float* sStat = sKb + NBUF * KF + mla_floats<ST>(BM * LDP);  // m, l, corr per row
  DEVP float* sBar = sStat + 3 * BM;  // BULK: an 8-byte mbarrier a key buffer

  const int n = info[0], key_start = info[1], q_offset = info[2], Hq = info[3], kps = info[4];
  const int M = (int)q_shape[1];
  const int NS = (int)threadgroups_per_grid_x_(_gx) * G;
  const int split = _gx * G + grp, r0 = _gy * BM, bb = _gz;
  const float sl2 = info_f[0] * MLA_LOG2E;  // the score scale, for exp2
  const long rbase = (long)bb * (long)rows_cap_(rows_shape, wq_shape);
  const int k_lo = split * kps;
  int k_hi = min(n, k_lo + kps);
  const int r_last = min(M, r0 + BM) - 1;
  k_hi = min(k_hi, q_offset + r_last / Hq - key_start + 1);  // causal: nothing past the last row

  if (BULK) {
    if (gt == 0) {
      MBAR_INIT(sBar, 1);
      MBAR_INIT(sBar + 2, 1);
    }
    BARRIER();
  }
  if (NBUF > 1 && k_lo < k_hi) {  // the first key tile streams in while the queries load
    if (BULK) {
      mla_decode_tile_bulk<ST, D, DQ, BK, NT>(TILE_PTR(ST, sKb, 0), rows, rbase, k_lo, k_hi, gt, sBar);
    } else {
      mla_decode_tile<ST, T, D, DQ, BK, NT>(TILE_PTR(ST, sKb, 0), rows, rbase, k_lo, k_hi, gt);
      ASYNC_COMMIT();
    }
  }
  // the query tile: async copies where they exist (all in flight at once, not one round trip each)
  for (int i = _tid; i < BM * (D / 8); i += G * NT) {
    const int r = i / (D / 8), d = (i % (D / 8)) * 8;
    const bool ok = r0 + r < M;
    mla_copy8<ST, T>(sQ + r * LDQ + d, q + ((long)bb * M + (ok ? r0 + r : 0)) * D + d, ok);
  }
  ASYNC_COMMIT();
  // landed before the barrier that publishes it; else the key loop's first wait covers it
  if (QREG || G > 1 || NBUF == 1 || BULK) ASYNC_WAIT0();
  // the last key visible to this thread's softmax row
  const int lim = r0 + gt / TPR < M ? q_offset + (r0 + gt / TPR) / Hq - key_start : -1;
  if (gt < BM) {
    sStat[gt] = MLA_NEG_INF;
    sStat[BM + gt] = 0.0f;
  }
  // this warp's scores: row block m0 / 16, contraction steps kq0 .. kq0 + NKQ - 1 (< NKS), keys n0..
  const int m0 = 16 * (gw & 1), kq = (gw >> 1) & 3, kq0 = kq * NKQ, n0 = (gw >> 3) * (8 * NST);
  FragA<PR> qf[QREG ? NKQ : 1];
  if (QREG) {
    BARRIER();
    PRAGMA_UNROLL
    for (int i = 0; i < NKQ; ++i)
      if (kq0 + i < NKS) frag_load_a<false>(qf[QREG ? i : 0], sQ, LDQ, m0, (kq0 + i) * KSTEP(PR));
  }
  if (G > 1 || QREG) BARRIER();  // the query tile is every group's, and (QREG) group 0's score tiles
  // output column tiles ct0 .. ct0 + NPW - 1 of both row blocks (adjacent pairs: one load, two tiles)
  const int ct0 = gw * NPW;
  FragC acc[2][NPW];
  PRAGMA_UNROLL
  for (int rb = 0; rb < 2; ++rb) {
    PRAGMA_UNROLL
    for (int j = 0; j < NPW; ++j) frag_zero(acc[rb][j]);
  }

  for (int k0 = k_lo, it = 0; k0 < k_hi; k0 += BK, ++it) {
    DEVP ST* sK = TILE_PTR(ST, sKb, (it % NBUF) * KF);
    if (NBUF > 1 && BULK) {
      if (k0 + BK < k_hi)
        mla_decode_tile_bulk<ST, D, DQ, BK, NT>(TILE_PTR(ST, sKb, ((it + 1) % NBUF) * KF), rows, rbase, k0 + BK, k_hi, gt,
                                                sBar + 2 * ((it + 1) % NBUF));
      MBAR_WAIT(sBar + 2 * (it % NBUF), (it / NBUF) & 1);
    } else if (NBUF > 1) {  // the next tile streams in during this one's math (issued before the wait,
      if (k0 + BK < k_hi)  // so that two tiles are in flight while it waits: decode is bound by the reads)
        mla_decode_tile<ST, T, D, DQ, BK, NT>(TILE_PTR(ST, sKb, ((it + 1) % NBUF) * KF), rows, rbase, k0 + BK, k_hi, gt);
      ASYNC_COMMIT();
      ASYNC_WAIT1();
    } else if (Q8) {
      MLA_GBAR();
      for (int i = gt; i < BK * (D / 8); i += NT) {
        const int kr = i / (D / 8), d = (i % (D / 8)) * 8;
        float x[8];
        if (k0 + kr < k_hi) {
          mla_row8<Q8, QG, DQ, T>(x, rows, wq, scales, biases, rbase + k0 + kr, d);
        } else {
          PRAGMA_UNROLL
          for (int e = 0; e < 8; ++e) x[e] = 0.0f;
        }
        st8<ST>(sK + kr * LDK + d, x);
      }
    } else {  // every load of the tile in flight before the first store
      MLA_GBAR();
      constexpr int NLD = (BK * (D / 8) + NT - 1) / NT;
      Raw8<T> raw[NLD];
      PRAGMA_UNROLL
      for (int j = 0; j < NLD; ++j) {
        const int i = gt + j * NT, kr = i / (D / 8), d = (i % (D / 8)) * 8;
        if (i < BK * (D / 8) && k0 + kr < k_hi) ld8(raw[j], rows + (rbase + k0 + kr) * DQ + d);
        else zero8(raw[j]);
      }
      PRAGMA_UNROLL
      for (int j = 0; j < NLD; ++j) {
        const int i = gt + j * NT, kr = i / (D / 8), d = (i % (D / 8)) * 8;
        if (i < BK * (D / 8)) {
          float x[8];
          PRAGMA_UNROLL
          for (int e = 0; e < 8; ++e) x[e] = get8(raw[j], e);
          st8<ST>(sK + kr * LDK + d, x);
        }
      }
    }
    MLA_GBAR();
    {  // S = Q K^T: warp w multiplies row block w & 1 by quarter (w >> 1) & 3 of the row width (NW 16: half the keys)
      FragC sc[NST];
      PRAGMA_UNROLL
      for (int t = 0; t < NST; ++t) frag_zero(sc[t]);
      PRAGMA_UNROLL
      for (int i = 0; i < NKQ; ++i) {
        const int ks = kq0 + i;
        if (ks < NKS) {
          FragA<PR> a;
          if (QREG) a = qf[QREG ? i : 0];
          else frag_load_a<false>(a, sQ, LDQ, m0, ks * KSTEP(PR));
          PRAGMA_UNROLL
          for (int t = 0; t < NST; t += 2) {
            FragB<PR> b0, b1;
            frag_load_b2<true>(b0, b1, sK, LDK, ks * KSTEP(PR), n0 + 8 * t);
            frag_mma(sc[t], a, b0);
            frag_mma(sc[t + 1], a, b1);
          }
        }
      }
      PRAGMA_UNROLL
      for (int t = 0; t < NST; ++t) frag_store_c(sc[t], sS + kq * (BM * LDS), LDS, m0, n0 + 8 * t);
    }
    MLA_GBAR();
    {  // online softmax in base 2 (row maxima too): TPR threads a row, KPT keys each, TPR apart (a
      const int r = gt / TPR, c0 = gt % TPR;  // warp's reads and writes fall in distinct banks)
      float sv[KPT];
      float mx = MLA_NEG_INF;
      PRAGMA_UNROLL
      for (int e = 0; e < KPT; ++e) {
        const int k = k0 + c0 + e * TPR;
        const int o = r * LDS + c0 + e * TPR;
        sv[e] = (k < k_hi && k <= lim)
                    ? ((sS[o] + sS[BM * LDS + o]) + (sS[2 * BM * LDS + o] + sS[3 * BM * LDS + o])) * sl2
                    : MLA_NEG_INF;
        mx = max(mx, sv[e]);
      }
      PRAGMA_UNROLL
      for (int o = 1; o < TPR; o *= 2) mx = max(mx, SHFL_XOR(mx, o));
      const float m_old = sStat[r];
      const float m_new = max(m_old, mx);
      const float m_use = m_new == MLA_NEG_INF ? 0.0f : m_new;
      float ps[KPT];
      float sum = 0.0f;
      PRAGMA_UNROLL
      for (int e = 0; e < KPT; ++e) {
        ps[e] = EXP2F(sv[e] - m_use);
        sum += ps[e];
      }
      PRAGMA_UNROLL
      for (int o = 1; o < TPR; o *= 2) sum += SHFL_XOR(sum, o);
      PRAGMA_UNROLL
      for (int e = 0; e < KPT; ++e) sP[r * LDP + c0 + e * TPR] = static_cast<ST>(ps[e]);
      WARP_SYNC();
      if (gt % TPR == 0) {
        const float corr = EXP2F(m_old - m_use);
        sStat[r] = m_new;
        sStat[BM + r] = sStat[BM + r] * corr + sum;
        sStat[2 * BM + r] = corr;
      }
    }
    MLA_GBAR();
    {  // O = corr * O + P V: warp w owns column tiles ct0.. of all 32 rows
      const int rl = frag_row(_lane);
      float cr[2][2];
      PRAGMA_UNROLL
      for (int rb = 0; rb < 2; ++rb) {
        cr[rb][0] = sStat[2 * BM + 16 * rb + rl];
        cr[rb][1] = sStat[2 * BM + 16 * rb + rl + 8];
      }
      if (!WARP_ALL(cr[0][0] == 1.0f && cr[0][1] == 1.0f && cr[1][0] == 1.0f && cr[1][1] == 1.0f)) {
        PRAGMA_UNROLL
        for (int rb = 0; rb < 2; ++rb) {  // a row's maximum moved: rescale
          PRAGMA_UNROLL
          for (int j = 0; j < NPW; ++j) frag_scale2(acc[rb][j], cr[rb][0], cr[rb][1]);
        }
      }
      PRAGMA_UNROLL
      for (int kk = 0; kk < BK; kk += KSTEP(PR)) {
        FragA<PR> pa[2];
        frag_load_a<false>(pa[0], sP, LDP, 0, kk);
        frag_load_a<false>(pa[1], sP, LDP, 16, kk);
        PRAGMA_UNROLL
        for (int j = 0; j < NPW; j += 2) {
          const int ct = ct0 + j;
          if (FULLCT || ct + 1 < DV / 8) {
            FragB<PR> b0, b1;
            frag_load_b2<false>(b0, b1, sK, LDK, kk, 8 * ct);
            PRAGMA_UNROLL
            for (int rb = 0; rb < 2; ++rb) {
              frag_mma(acc[rb][j], pa[rb], b0);
              frag_mma(acc[rb][j + 1], pa[rb], b1);
            }
          } else if (ct < DV / 8) {
            FragB<PR> b;
            frag_load_b<false>(b, sK, LDK, kk, 8 * ct);
            PRAGMA_UNROLL
            for (int rb = 0; rb < 2; ++rb) frag_mma(acc[rb][j], pa[rb], b);
          }
        }
      }
    }
    if (NBUF > 1) MLA_GBAR();  // every warp is done with this tile before the next iteration refills it
  }
  MLA_GBAR();
  const long obase = ((long)bb * NS + split) * M;
  PRAGMA_UNROLL
  for (int rb = 0; rb < 2; ++rb) {
    const int rl = 16 * rb + frag_row(_lane);
    const float l_lo = sStat[BM + rl], l_hi = sStat[BM + rl + 8];
    const float i_lo = l_lo > 0.0f ? 1.0f / l_lo : 0.0f, i_hi = l_hi > 0.0f ? 1.0f / l_hi : 0.0f;
    PRAGMA_UNROLL
    for (int j = 0; j < NPW; ++j) {
      const int ct = ct0 + j;
      if (FULLCT || ct < DV / 8) {
        PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int row = r0 + rl + 8 * (e >> 1);
          if (row < M)
            o_part[(obase + row) * DV + 8 * ct + frag_col(_lane) + (e & 1)] =
                frag_get(acc[rb][j], e) * ((e >> 1) ? i_hi : i_lo);
        }
      }
    }
  }
  if (gt < BM && r0 + gt < M) {
    const float l = sStat[BM + gt];
    lse_part[obase + r0 + gt] = l > 0.0f ? sStat[gt] * MLA_LN2 + LOGF(l) : MLA_NEG_INF;
  }
#undef MLA_GBAR
"""

# Template: T (output dtype), DV (a multiple of 4), NTC (threads, a multiple of 32), CW (columns a
# threadgroup, a multiple of 4), TWO (a second set of partials). Inputs: o_part [B, NS1, M, DV]
# fp32, lse_part [B, NS1, M] fp32, and o_tail [B, NS2, M, DV], lse_tail [B, NS2, M] (dummies unless
# TWO: the tail segment's partials, read where they are instead of concatenated first; NS1 + NS2 <=
# MLA_MAX_SPLITS). Output: o [B, M, DV] (T).
# Grid: (NTC * ceil(DV / CW), M, B): a threadgroup takes CW columns of one row; its threads split
# both the columns (4 each) and the splits (NTC / (CW / 4) groups), so that many loads are in flight.
COMBINE_BODY = r"""
/*@PROLOGUE@*/
  constexpr int MAXS = MLA_MAX_SPLITS, CPT = 4, LPS = CW / CPT, SG = NTC / LPS, U = 8;
  static_assert(CW % CPT == 0 && NTC % LPS == 0 && NTC % 32 == 0 && DV % CPT == 0, "mla combine shape");
  SHARED_ARR(float, sw, MAXS);
  SHARED_ARR(float, sred, NTC / 32);
  SHARED_ARR(float, sden, NTC / 32);
  SHARED_ARR(float, sacc, SG * CW);
  const int NS1 = (int)lse_part_shape[1], M = (int)lse_part_shape[2];
  const int NS2 = TWO ? (int)lse_tail_shape[1] : 0, NS = NS1 + NS2;
  const int row = _gy, bb = _gz, c0 = _gx * CW;
  const long lbase = (long)bb * NS1 * M + row, lbase2 = (long)bb * NS2 * M + row;
#define MLA_LSE(s) ((s) < NS1 ? lse_part[lbase + (long)(s) * M] : lse_tail[lbase2 + (long)((s) - NS1) * M])
  const int sg = _tid / LPS, cl = (_tid % LPS) * CPT, c = c0 + cl;
  const long obase = ((long)bb * NS1 * M + row) * DV + c, obase2 = ((long)bb * NS2 * M + row) * DV + c;
  // U splits' values of this thread (split group sg: splits s0, s0 + SG, ...), all loads in flight at once
#define MLA_LOAD_BATCH(v, s0) do { PRAGMA_UNROLL for (int u = 0; u < U; ++u) { const int s_ = (s0) + u * SG; \
    PRAGMA_UNROLL for (int i = 0; i < CPT; ++i) (v)[u][i] = c >= DV || s_ >= NS ? 0.0f \
        : s_ < NS1 ? o_part[obase + (long)s_ * M * DV + i] : o_tail[obase2 + (long)(s_ - NS1) * M * DV + i]; } } while (0)
  float v[U][CPT];
  MLA_LOAD_BATCH(v, sg);  // the first batch loads while the weights are worked out
  float mx = MLA_NEG_INF;
  for (int s = _tid; s < NS; s += NTC) mx = max(mx, MLA_LSE(s));
  mx = max(mx, SHFL_XOR(mx, 16));
  mx = max(mx, SHFL_XOR(mx, 8));
  mx = max(mx, SHFL_XOR(mx, 4));
  mx = max(mx, SHFL_XOR(mx, 2));
  mx = max(mx, SHFL_XOR(mx, 1));
  if (_lane == 0) sred[_warp] = mx;
  BARRIER();
  mx = sred[0];
  for (int w = 1; w < NTC / 32; ++w) mx = max(mx, sred[w]);
  const float m_use = mx == MLA_NEG_INF ? 0.0f : mx;
  float den = 0.0f;
  for (int s = _tid; s < NS; s += NTC) {
    const float w = EXPF(MLA_LSE(s) - m_use);
    sw[s] = w;
    den += w;
  }
  den = WARP_SUM(den);
  if (_lane == 0) sden[_warp] = den;
  BARRIER();
  den = 0.0f;
  for (int w = 0; w < NTC / 32; ++w) den += sden[w];
  float acc[CPT];
  PRAGMA_UNROLL
  for (int i = 0; i < CPT; ++i) acc[i] = 0.0f;
  for (int s0 = sg; s0 < NS; s0 += U * SG) {
    PRAGMA_UNROLL
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u * SG;
      const float w = s < NS ? sw[s] : 0.0f;
      PRAGMA_UNROLL
      for (int i = 0; i < CPT; ++i) acc[i] += w > 0.0f ? w * v[u][i] : 0.0f;  // (an empty split adds 0, whatever it holds)
    }
    if (s0 + U * SG < NS) MLA_LOAD_BATCH(v, s0 + U * SG);
  }
  PRAGMA_UNROLL
  for (int i = 0; i < CPT; ++i) sacc[sg * CW + cl + i] = acc[i];
  BARRIER();
  if (_tid < CW && c0 + _tid < DV) {
    float t = 0.0f;
    for (int g = 0; g < SG; ++g) t += sacc[g * CW + _tid];
    o[((long)bb * M + row) * DV + c0 + _tid] = static_cast<T>(den > 0.0f ? t / den : 0.0f);
  }
#undef MLA_LSE
#undef MLA_LOAD_BATCH
"""

# Template: T, ST, PR, NOPE, DR, DV, DL (column of k_pe in a cached row), D (row width), NW, RW
# (16-row query tiles a warp: 2 uses each key/value fragment twice), HAS_INIT, QREG (keep the query
# fragments in registers; RW 1 only), NBUF (key/value tile buffers: 2 streams the next tile in with
# async copies, 1 loads each tile when it is needed).
# Inputs: q [B, Tq, H, NOPE + DR] (T); kv [B, n, H, NOPE + DV] (T, kv_b_proj of the rows);
# rows [B, n, D] (T); o_in [B, Tq, H, DV] fp32, lse_in [B, H, Tq] fp32 (dummies unless HAS_INIT);
# info int32 [n, key_start, q_offset]; info_f [scale].
# Outputs: o [B, Tq, H, DV] fp32 (normalised), lse [B, H, Tq] fp32 (+ scratch on Metal).
# Grid: (H * 32 * NW, ceil(Tq / BQ), B), BQ = 16 * RW * NW. Heads vary fastest and the query blocks
# run last to first: the causal blocks with the most keys start first, the short ones fill the tail.
PREFILL_BODY = r"""
/*@PROLOGUE@*/
  constexpr int DK = NOPE + DR, BQ = 16 * RW * NW, BKN = 64, NT = 32 * NW;
  constexpr int LDQ = DK + 8, LDK = DK + 8, LDV = DV + 8;
  constexpr int NKS = DK / KSTEP(PR);
  static_assert(NOPE % 8 == 0 && DR % 8 == 0 && DV % 8 == 0 && DK % KSTEP(PR) == 0, "mla prefill shape");
  static_assert(RW == 1 || !QREG, "query fragments in registers with one row tile a warp only");
/*@SMEM@*/
  // NBUF key/value tile pairs: with 2 the next tile streams in (cp.async) during this one's math
  const int KVF = mla_floats<ST>(BKN * LDK) + mla_floats<ST>(BKN * LDV);
  DEVP ST* sQ = TILE_PTR(ST, smem, 0);
  DEVP float* sKV = smem + mla_floats<ST>(BQ * LDQ);

  const int n = info[0], key_start = info[1], q_offset = info[2];
  const float scale = info_f[0], sl2 = scale * MLA_LOG2E;  // scores to log2 units
  const int Tq = (int)q_shape[1], Hn = (int)q_shape[2];
  const int q0 = ((Tq + BQ - 1) / BQ - 1 - _gy) * BQ, h = _gx, bb = _gz;
  const int rw = q0 + 16 * RW * _warp;  // first query row of this warp
  const int lim_w = q_offset + rw - key_start;  // the last key every row of the warp sees
  // row tile i of the warp: rows r_lo[i] and r_hi[i] = r_lo[i] + 8 of this lane, their last visible key (< n)
  int r_lo[RW], r_hi[RW], lim_lo[RW], lim_hi[RW];
  PRAGMA_UNROLL
  for (int i = 0; i < RW; ++i) {
    r_lo[i] = rw + 16 * i + frag_row(_lane);
    r_hi[i] = r_lo[i] + 8;
    lim_lo[i] = min(n - 1, q_offset + r_lo[i] - key_start);
    lim_hi[i] = min(n - 1, q_offset + r_hi[i] - key_start);
  }
  const int k_end = min(n, q_offset + min(Tq, q0 + BQ) - 1 - key_start + 1);

  for (int i = _tid; i < BQ * (DK / 8); i += NT) {
    const int r = i / (DK / 8), d = (i % (DK / 8)) * 8;
    mla_tile8<ST, T>(sQ + r * LDQ + d, q + (((long)bb * Tq + q0 + r) * Hn + h) * DK + d, q0 + r < Tq);
  }
  FragC acc[RW][DV / 8];
  float m_lo[RW], m_hi[RW], l_lo[RW], l_hi[RW];
  PRAGMA_UNROLL
  for (int i = 0; i < RW; ++i) {
    if (HAS_INIT) {  // continue from an earlier block's (o, lse): l = 1 on one lane of each row
      PRAGMA_UNROLL
      for (int j = 0; j < DV / 8; ++j) {
        PRAGMA_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int r = (e >> 1) ? r_hi[i] : r_lo[i];
          frag_set(acc[i][j], e, r < Tq ? o_in[(((long)bb * Tq + r) * Hn + h) * DV + 8 * j + frag_col(_lane) + (e & 1)] : 0.0f);
        }
      }
      // m is kept in raw score units (the scale goes into the exponent)
      m_lo[i] = r_lo[i] < Tq ? lse_in[((long)bb * Hn + h) * Tq + r_lo[i]] / scale : MLA_NEG_INF;
      m_hi[i] = r_hi[i] < Tq ? lse_in[((long)bb * Hn + h) * Tq + r_hi[i]] / scale : MLA_NEG_INF;
      l_lo[i] = l_hi[i] = frag_col(_lane) == 0 ? 1.0f : 0.0f;
    } else {
      PRAGMA_UNROLL
      for (int j = 0; j < DV / 8; ++j) frag_zero(acc[i][j]);
      m_lo[i] = m_hi[i] = MLA_NEG_INF;
      l_lo[i] = l_hi[i] = 0.0f;
    }
  }
  BARRIER();
  FragA<PR> qf[QREG ? NKS : 1];
  if (QREG) {
    PRAGMA_UNROLL
    for (int ks = 0; ks < NKS; ++ks) frag_load_a<false>(qf[QREG ? ks : 0], sQ, LDQ, 16 * RW * _warp, ks * KSTEP(PR));
  }

  if (NBUF > 1 && k_end > 0) {
    mla_prefill_tile<ST, T, NOPE, DR, DV, D, DL, BKN, NT>(TILE_PTR(ST, sKV, 0), TILE_PTR(ST, sKV, mla_floats<ST>(BKN * LDK)),
                                                         kv, rows, bb, n, Hn, h, 0, _tid);
    ASYNC_COMMIT();
  }
  for (int k0 = 0, it = 0; k0 < k_end; k0 += BKN, ++it) {
    DEVP ST* sK = TILE_PTR(ST, sKV, (it % NBUF) * KVF);
    DEVP ST* sV = TILE_PTR(ST, sKV, (it % NBUF) * KVF + mla_floats<ST>(BKN * LDK));
    if (NBUF == 1) {
      BARRIER();  // every warp is done with the tiles before they are overwritten
      mla_prefill_tile<ST, T, NOPE, DR, DV, D, DL, BKN, NT>(sK, sV, kv, rows, bb, n, Hn, h, k0, _tid);
      ASYNC_COMMIT();  // (copies may still be asynchronous: wait for them)
      ASYNC_WAIT0();
    } else {
      ASYNC_WAIT0();  // this thread's copies of tile `it` have landed (the only ones in flight)
    }
    BARRIER();  // tile `it` is complete; (NBUF 2) and every warp is done with the other buffer,
    if (NBUF > 1 && k0 + BKN < k_end) {  // so the next tile streams into it during this one's math
      const int nb = ((it + 1) % NBUF) * KVF;
      mla_prefill_tile<ST, T, NOPE, DR, DV, D, DL, BKN, NT>(TILE_PTR(ST, sKV, nb), TILE_PTR(ST, sKV, nb + mla_floats<ST>(BKN * LDK)),
                                                           kv, rows, bb, n, Hn, h, k0 + BKN, _tid);
      ASYNC_COMMIT();
    }
    if (rw < Tq && k0 <= q_offset + rw + 16 * RW - 1 - key_start) {  // else every key is in the future
      FragC s[RW][BKN / 8];
      PRAGMA_UNROLL
      for (int i = 0; i < RW; ++i) {
        PRAGMA_UNROLL
        for (int j = 0; j < BKN / 8; ++j) frag_zero(s[i][j]);
      }
      PRAGMA_UNROLL
      for (int ks = 0; ks < NKS; ++ks) {
        FragA<PR> a[RW];
        PRAGMA_UNROLL
        for (int i = 0; i < RW; ++i) {
          if (QREG) a[i] = qf[QREG ? ks : 0];
          else frag_load_a<false>(a[i], sQ, LDQ, 16 * (RW * _warp + i), ks * KSTEP(PR));
        }
        PRAGMA_UNROLL
        for (int j = 0; j < BKN / 8; j += 2) {  // BKN / 8 is even
          FragB<PR> b0, b1;
          frag_load_b2<true>(b0, b1, sK, LDK, ks * KSTEP(PR), 8 * j);
          PRAGMA_UNROLL
          for (int i = 0; i < RW; ++i) {
            frag_mma(s[i][j], a[i], b0);
            frag_mma(s[i][j + 1], a[i], b1);
          }
        }
      }
      // only the tiles across the diagonal or past n need a mask (warp-uniform). A branch, not
      // predication: predicated, the mask cost every tile ~250 instructions a warp (320 mma)
      if (k0 + BKN > n || k0 + BKN - 1 > lim_w) {
        KEEP_BRANCH();
        PRAGMA_UNROLL
        for (int i = 0; i < RW; ++i) {
          PRAGMA_UNROLL
          for (int j = 0; j < BKN / 8; ++j) {
            PRAGMA_UNROLL
            for (int e = 0; e < 4; ++e) {
              if (k0 + 8 * j + frag_col(_lane) + (e & 1) > ((e >> 1) ? lim_hi[i] : lim_lo[i])) frag_set(s[i][j], e, MLA_NEG_INF);
            }
          }
        }
      }
      PRAGMA_UNROLL
      for (int i = 0; i < RW; ++i) {  // online softmax of row tile i, in raw scores (scale > 0)
        float mx_lo = MLA_NEG_INF, mx_hi = MLA_NEG_INF;
        PRAGMA_UNROLL
        for (int j = 0; j < BKN / 8; ++j) {
          PRAGMA_UNROLL
          for (int e = 0; e < 4; ++e) {
            const float v = frag_get(s[i][j], e);
            if (e >> 1) mx_hi = max(mx_hi, v); else mx_lo = max(mx_lo, v);
          }
        }
        mx_lo = max(mx_lo, SHFL_XOR(mx_lo, ROW_XOR_A));
        mx_lo = max(mx_lo, SHFL_XOR(mx_lo, ROW_XOR_B));
        mx_hi = max(mx_hi, SHFL_XOR(mx_hi, ROW_XOR_A));
        mx_hi = max(mx_hi, SHFL_XOR(mx_hi, ROW_XOR_B));
        const float mn_lo = max(m_lo[i], mx_lo), mn_hi = max(m_hi[i], mx_hi);
        const float mu_lo = mn_lo == MLA_NEG_INF ? 0.0f : mn_lo * sl2;
        const float mu_hi = mn_hi == MLA_NEG_INF ? 0.0f : mn_hi * sl2;
        const float c_lo = EXP2F(m_lo[i] * sl2 - mu_lo), c_hi = EXP2F(m_hi[i] * sl2 - mu_hi);
        m_lo[i] = mn_lo;
        m_hi[i] = mn_hi;
        float sum_lo = 0.0f, sum_hi = 0.0f;
        PRAGMA_UNROLL
        for (int j = 0; j < BKN / 8; ++j) {
          PRAGMA_UNROLL
          for (int e = 0; e < 4; ++e) {
            const float p = EXP2F(frag_get(s[i][j], e) * sl2 - ((e >> 1) ? mu_hi : mu_lo));
            frag_set(s[i][j], e, p);
            if (e >> 1) sum_hi += p; else sum_lo += p;
          }
        }
        l_lo[i] = l_lo[i] * c_lo + sum_lo;
        l_hi[i] = l_hi[i] * c_hi + sum_hi;
        if (!WARP_ALL(c_lo == 1.0f && c_hi == 1.0f)) {  // no row's maximum moved: nothing to rescale
          PRAGMA_UNROLL
          for (int j = 0; j < DV / 8; ++j) frag_scale2(acc[i][j], c_lo, c_hi);
        }
      }
      PRAGMA_UNROLL
      for (int kk = 0; kk < BKN / KSTEP(PR); ++kk) {
        FragA<PR> pa[RW];
        PRAGMA_UNROLL
        for (int i = 0; i < RW; ++i) frag_a_from_c(pa[i], s[i] + kk * (KSTEP(PR) / 8));
        PRAGMA_UNROLL
        for (int j = 0; j < DV / 8; j += 2) {
          if (j + 1 < DV / 8) {
            FragB<PR> b0, b1;
            frag_load_b2<false>(b0, b1, sV, LDV, kk * KSTEP(PR), 8 * j);
            PRAGMA_UNROLL
            for (int i = 0; i < RW; ++i) {
              frag_mma(acc[i][j], pa[i], b0);
              frag_mma(acc[i][j + 1], pa[i], b1);
            }
          } else {
            FragB<PR> b;
            frag_load_b<false>(b, sV, LDV, kk * KSTEP(PR), 8 * j);
            PRAGMA_UNROLL
            for (int i = 0; i < RW; ++i) frag_mma(acc[i][j], pa[i], b);
          }
        }
      }
    }
  }
  PRAGMA_UNROLL
  for (int i = 0; i < RW; ++i) {
    float ll = l_lo[i], lh = l_hi[i];
    ll += SHFL_XOR(ll, ROW_XOR_A);
    ll += SHFL_XOR(ll, ROW_XOR_B);
    lh += SHFL_XOR(lh, ROW_XOR_A);
    lh += SHFL_XOR(lh, ROW_XOR_B);
    const float i_lo = ll > 0.0f ? 1.0f / ll : 0.0f, i_hi = lh > 0.0f ? 1.0f / lh : 0.0f;
    PRAGMA_UNROLL
    for (int j = 0; j < DV / 8; ++j) {
      PRAGMA_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int r = (e >> 1) ? r_hi[i] : r_lo[i];
        if (r < Tq)
          o[(((long)bb * Tq + r) * Hn + h) * DV + 8 * j + frag_col(_lane) + (e & 1)] =
              frag_get(acc[i][j], e) * ((e >> 1) ? i_hi : i_lo);
      }
    }
    if (frag_col(_lane) == 0) {
      if (r_lo[i] < Tq) lse[((long)bb * Hn + h) * Tq + r_lo[i]] = ll > 0.0f ? m_lo[i] * scale + LOGF(ll) : MLA_NEG_INF;
      if (r_hi[i] < Tq) lse[((long)bb * Hn + h) * Tq + r_hi[i]] = lh > 0.0f ? m_hi[i] * scale + LOGF(lh) : MLA_NEG_INF;
    }
  }
"""

DECODE_INPUTS = ["q", "rows", "wq", "scales", "biases", "info", "info_f"]
COMBINE_INPUTS = ["o_part", "lse_part", "o_tail", "lse_tail"]
PREFILL_INPUTS = ["q", "kv", "rows", "o_in", "lse_in", "info", "info_f"]


def outputs(kind: str, dialect: Dialect) -> list[str]:
    scratch = ["scratch"] if dialect.scratch_output else []
    if kind == "mla_decode":
        return ["o_part", "lse_part"] + scratch
    if kind == "mla_combine":
        return ["o"]
    if kind == "mla_prefill":
        return ["o", "lse"] + scratch
    raise ValueError(kind)


def inputs(kind: str) -> list[str]:
    return {"mla_decode": DECODE_INPUTS, "mla_combine": COMBINE_INPUTS,
            "mla_prefill": PREFILL_INPUTS}[kind]


MAX_SPLITS = 1024  # partials one combine takes (MLA_MAX_SPLITS)


def decode_smem_floats(D: int, st_bytes: int, nbuf: int = 1, bk: int = 32, groups: int = 1,
                       qreg: bool = False, bulk: bool = False) -> int:
    """Tile memory of one decode threadgroup, in floats (mirrors DECODE_BODY)."""
    f = lambda n: (n * st_bytes + 3) // 4  # noqa: E731
    BM, BK = 32, bk
    q, s4 = f(BM * (D + 8)), 4 * BM * (BK + 8)
    sq = max(q, s4) if qreg else s4
    return (0 if qreg else q) + groups * (sq + nbuf * f(BK * (D + 8)) + f(BM * (BK + 8)) + 3 * BM + (4 if bulk else 0))


def prefill_smem_floats(DK: int, DV: int, NW: int, st_bytes: int, nbuf: int = 1, rw: int = 1) -> int:
    """Tile memory of one prefill threadgroup, in floats (mirrors PREFILL_BODY)."""
    f = lambda n: (n * st_bytes + 3) // 4  # noqa: E731
    return f(16 * rw * NW * (DK + 8)) + nbuf * (f(64 * (DK + 8)) + f(64 * (DV + 8)))


_BODIES = {"mla_decode": DECODE_BODY, "mla_combine": COMBINE_BODY, "mla_prefill": PREFILL_BODY}


def render(dialect: Dialect, kind: str) -> tuple[str, str]:
    """(header, body) of `kind` ('mla_decode', 'mla_combine', 'mla_prefill') in `dialect`."""
    header = dialect.header + _DIALECT_EXTRA[dialect.name] + MLA_HEADER
    body = _BODIES[kind].replace("/*@PROLOGUE@*/", dialect.prologue)
    return header, body.replace("/*@SMEM@*/", dialect.smem)


# grid size and the batch stride of the cached rows: MLX hands both over differently per dialect
_DIALECT_EXTRA = {
    "metal": r"""
#define threadgroups_per_grid_x_(gx) ((int)threadgroups_per_grid.x)
#define rows_cap_(rs, ws) (Q8 ? (ws)[1] : (rs)[1])
""",
    "cuda": r"""
#define threadgroups_per_grid_x_(gx) ((int)gridDim.x)
#define rows_cap_(rs, ws) (Q8 ? (ws)[1] : (rs)[1])
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
""",
}
