"""The KDA kernels, written once. `render(dialect, kind)` returns (header, body) for
mx.fast.metal_kernel / mx.fast.cuda_kernel; only dialect.py differs between the two.

Prefill (chunk scan), per threadgroup = (v-slice, head, batch), chunks of BT = 64 tokens in
sequence, state S [K, BV] carried in fp32 tile memory. For one chunk, with G the in-chunk
cumulative log decay (per channel), Gamma = exp(G), and sub-blocks of 16 rows:

  Akk[t,s] = sum_d k_t k_s exp(G_t - G_s)   (s < t)      Aqk[t,s] = same with q_t (s <= t)
      diagonal 16x16 blocks: elementwise exp(G_t - G_s) (exponent <= 0)
      blocks below it: matrix products of k_t exp(G_t - R_i) and k_s exp(R_i - G_s) with the
      reference R_i = G at the end of the previous sub-block, so both exponents stay <= 0
  L = diag(beta) Akk (strictly lower), M = (I + L)^-1 by 16x16 diagonal inverses + block
      substitution (matrix products)
  Y = beta*(V - (Gamma*K) S),  U = M Y,  O = (Gamma*Q) S + Aqk U
  S <- diag(Gamma_last) S + (exp(G_last - G) * K)^T U

L2 norm of q, k, the gate g = -exp(A_log) softplus(f + dt_bias) and sigmoid(beta) are computed
from the raw projections as the chunk is loaded.
"""
from __future__ import annotations

from .dialect import Dialect

# ---------------------------------------------------------------------------------------------
# Dialect-neutral helpers (after the dialect header).
COMMON_HEADER = r"""
// One matrix job inside a phase: C[M x N] = out_scale * (cin_scale * Cin + A B), as 16 x (8*NB)
// warp tiles; the job's tiles are numbered from `first` within the phase so that several jobs
// spread over the warps. Block structure (16-row blocks) limits the contraction range:
//   AM: 0 full, 1 A block-lower (k < m0+16), 2 strictly block-lower (k < m0), 3 block-diagonal
//   BM: 0 full, 1 B block-lower (k >= nb), 2 strictly (k >= nb+16), 3 block-diagonal (nb <= k < nb+16)
// with nb = n0 rounded down to 16. SLOW: only tiles strictly below the block diagonal.
template <int PR, int NB, bool TA, bool TB, int AM, int BM, bool CIN, bool SLOW,
          typename PA, typename PB, typename PC, typename PD>
DFN void gemm_job(int warp, int nwarps, int first, PA A, int lda, PB B, int ldb,
                  int M, int N, int Kd, PC Cin, int ldcin, float cin_scale,
                  PD C, int ldc, float out_scale) {
  static_assert(BM == 0 || NB <= 2, "block-structured B needs tiles inside one 16-column block");
  const int ntn = N / (8 * NB);
  const int ntasks = (M / 16) * ntn;
  int i = (warp - first) % nwarps;
  if (i < 0) i += nwarps;
  for (; i < ntasks; i += nwarps) {
    const int m0 = (i / ntn) * 16;
    const int n0 = (i % ntn) * (8 * NB);
    const int nb = (n0 / 16) * 16;
    if (SLOW && m0 <= nb) continue;
    FragC c[NB];
    PRAGMA_UNROLL
    for (int j = 0; j < NB; ++j) {
      if (CIN) {
        frag_load_c(c[j], Cin, ldcin, m0, n0 + 8 * j);
        if (cin_scale != 1.0f) frag_scale(c[j], cin_scale);
      } else {
        frag_zero(c[j]);
      }
    }
    int klo = 0, khi = Kd;
    if (AM == 1) khi = Kd < m0 + 16 ? Kd : m0 + 16;
    if (AM == 2) khi = m0;
    if (AM == 3) { klo = m0; khi = m0 + 16; }
    if (BM == 1 || BM == 3) klo = klo > nb ? klo : nb;
    if (BM == 2) klo = klo > nb + 16 ? klo : nb + 16;
    if (BM == 3) khi = khi < nb + 16 ? khi : nb + 16;
    for (int k0 = klo; k0 < khi; k0 += KSTEP(PR)) {
      FragA<PR> a;
      frag_load_a<TA>(a, A, lda, m0, k0);
      PRAGMA_UNROLL
      for (int j = 0; j < NB; ++j) {
        FragB<PR> b;
        frag_load_b<TB>(b, B, ldb, k0, n0 + 8 * j);
        frag_mma(c[j], a, b);
      }
    }
    PRAGMA_UNROLL
    for (int j = 0; j < NB; ++j) {
      if (out_scale != 1.0f) frag_scale(c[j], out_scale);
      frag_store_c(c[j], C, ldc, m0, n0 + 8 * j);
    }
  }
}

// One stage of a transpose-reduction over 32 lanes: lanes with bit W set keep the upper half
// of acc[0..2W) and send the lower half to their partner, and the reverse.
template <int W>
DFN void kda_tr_stage(TH float* acc, int lane) {
  const bool up = (lane & W) != 0;
  PRAGMA_UNROLL
  for (int i = 0; i < W; ++i) {
    const float send = up ? acc[i] : acc[i + W];
    const float keep = up ? acc[i + W] : acc[i];
    acc[i] = keep + SHFL_XOR(send, W);
  }
}

DFN void kda_tr_reduce(TH float* acc, int lane) {
  kda_tr_stage<16>(acc, lane);
  kda_tr_stage<8>(acc, lane);
  kda_tr_stage<4>(acc, lane);
  kda_tr_stage<2>(acc, lane);
  kda_tr_stage<1>(acc, lane);
}

// Diagonal 16x16 block at rows/cols base..base+15 of Aqk (t >= s) and Akk (t > s), columns
// s1 and s2 = 15 - s1 (equal work), by one warp: lanes run over channels. Along a column the
// decay exp(G_t - G_s) is the running product of exp(g_t) (sAe, each factor <= 1) from row s
// down; the chains run a fixed 16 (s1) and 8 (s2 >= 8) rows, and rows past the block (read
// from the neighbouring tiles) are discarded when storing. Rows are reduced across lanes.
template <int KD, int LDK_, int LDA_, typename PT>
DFN void kda_diag_pair(PT sQ, PT sK, PT sAe, PT sA, PT sP, int base, int s1, int lane) {
  const int s2 = 15 - s1;
  float a1[32], a2[32];
  PRAGMA_UNROLL
  for (int i = 0; i < 32; ++i) { a1[i] = 0.0f; a2[i] = 0.0f; }
  for (int d = lane; d < KD; d += 32) {
    float e = sK[(base + s1) * LDK_ + d];
    PRAGMA_UNROLL
    for (int u = 0; u < 16; ++u) {
      const int t = base + s1 + u;
      if (u > 0) e *= sAe[t * LDK_ + d];
      a1[u] += sQ[t * LDK_ + d] * e;
      a1[16 + u] += sK[t * LDK_ + d] * e;
    }
    e = sK[(base + s2) * LDK_ + d];
    PRAGMA_UNROLL
    for (int u = 0; u < 8; ++u) {
      const int t = base + s2 + u;
      if (u > 0) e *= sAe[t * LDK_ + d];
      a2[u] += sQ[t * LDK_ + d] * e;
      a2[16 + u] += sK[t * LDK_ + d] * e;
    }
  }
  kda_tr_reduce(a1, lane);
  kda_tr_reduce(a2, lane);
  // lane l: u = l % 16, Aqk (l < 16) or Akk (l >= 16); row s + u, or zero at row s + u - 16
  const int u = lane & 15;
  const bool is_k = lane >= 16;
  DEVP float* dst = is_k ? sA : sP;
  const int t1 = s1 + u, t2 = s2 + u;
  dst[(base + (t1 & 15)) * LDA_ + base + s1] = (t1 < 16 && !(is_k && u == 0)) ? a1[0] : 0.0f;
  dst[(base + (t2 & 15)) * LDA_ + base + s2] = (t2 < 16 && !(is_k && u == 0)) ? a2[0] : 0.0f;
}

DFN float kda_sigmoid(float x) { return 1.0f / (1.0f + EXPF(-x)); }
// softplus, linear above 20 (as torch)
DFN float kda_softplus(float x) { return x > 20.0f ? x : LOGF(1.0f + EXPF(x)); }
"""

# ---------------------------------------------------------------------------------------------
# Prefill body. Template constants: T (input dtype), K, V, BV, NT (threads), HAS_INIT, PI
# (precision of the intra-chunk products), PS (precision of the state products), PF (issue the
# next chunk's global loads a chunk ahead; costs registers), SMEM_FLOATS.
# Inputs: q_raw, k_raw, f [B,L,H,K]; v [B,L,H,V]; b_raw [B,L,H]; dt_bias [H*K]; A_log [H];
# init_state [B,H,K,V] fp32 (any 1-element array when HAS_INIT is false).
# Outputs: o [B,L,H,V] (T), state_out [B,H,K,V] fp32 (+ scratch on Metal).
PREFILL_BODY = r"""
/*@PROLOGUE@*/
  constexpr int BT = 64;
  constexpr int NW = NT / 32;
  // row strides: 8 floats past a multiple of 32 keeps paired fragment loads free of bank conflicts
  constexpr int LDK = K + 8;
  constexpr int LDV = BV + 8;
  constexpr int LDA = BT + 8;
  constexpr int OFF_Q = 0;                      // q^ -> q*exp(G-R) -> Gamma*q -> O1 = (Gamma q) S
  constexpr int OFF_K = OFF_Q + BT * LDK;       // k^ -> k*exp(R'-G) (stages) -> exp(G_last-G)*k
  constexpr int OFF_G = OFF_K + BT * LDK;       // g -> G -> k*exp(G-R) -> beta*Gamma*k
  constexpr int OFF_V = OFF_G + BT * LDK;       // beta*v -> Y
  constexpr int OFF_U = OFF_V + BT * LDV;       // U
  constexpr int OFF_S = OFF_U + BT * LDV;       // state slice [K][BV]
  constexpr int OFF_A = OFF_S + K * LDV;        // Akk -> L -> M -> O staging
  constexpr int OFF_P = OFF_A + BT * LDA;       // Aqk
  constexpr int OFF_E = OFF_P + BT * LDA;       // E = D L
  constexpr int OFF_F = OFF_E + BT * LDA;       // R2 -> W = (I + R2) D
  constexpr int OFF_R = OFF_F + BT * LDA;       // R_1..R_4: G at the end of each sub-block
  constexpr int OFF_GAM = OFF_R + 4 * K;        // exp(G_last)
  constexpr int OFF_BETA = OFF_GAM + K;         // beta
  constexpr int OFF_END = OFF_BETA + BT;
  static_assert(OFF_END <= SMEM_FLOATS, "tile memory too small");
  static_assert(K % 32 == 0 && V % BV == 0 && BV % 16 == 0 && BV <= BT, "shape");
  static_assert(NT % K == 0 && NW >= 4 && NW <= 16, "threads");
  constexpr int RS = NT / K;                    // elementwise passes: thread = (channel, row phase)
  constexpr int G8 = K / 8;                     // chunk load: threads per row (8 channels each)
  constexpr int NG = BT * G8 / NT;              // chunk load: rows per thread
  constexpr int NV8 = BT * BV / 8;              // groups of 8 in the v slice
  constexpr int NGV = (NV8 + NT - 1) / NT;
  static_assert((G8 & (G8 - 1)) == 0 && G8 <= 32 && NG * NT == BT * G8 && 16 % RS == 0, "layout");
/*@SMEM@*/
  DEVP float* sQ = smem + OFF_Q;
  DEVP float* sK = smem + OFF_K;
  DEVP float* sG = smem + OFF_G;
  DEVP float* sV = smem + OFF_V;
  DEVP float* sU = smem + OFF_U;
  DEVP float* sS = smem + OFF_S;
  DEVP float* sA = smem + OFF_A;
  DEVP float* sP = smem + OFF_P;
  DEVP float* sE = smem + OFF_E;
  DEVP float* sF = smem + OFF_F;
  DEVP float* sR = smem + OFF_R;
  DEVP float* sGam = smem + OFF_GAM;
  DEVP float* sBeta = smem + OFF_BETA;

  const int L = (int)q_raw_shape[1];
  const int Hn = (int)q_raw_shape[2];
  const int v0 = _gx * BV;
  const int h = _gy;
  const int bb = _gz;
  const float a_h = EXPF(A_log[h]);
  const float qscale = RSQRTF((float)K);
  const int c8 = (_tid % G8) * 8;          // chunk load: this thread's 8 channels (every row)
  const int ed = _tid % K;                 // elementwise passes: this thread's channel
  const int er = _tid / K;                 // ... and its first row (rows er, er+RS, ...)
  float dtb[8];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) dtb[i] = dt_bias[h * K + c8 + i];
#ifdef KDA_PROF
  long _pt = KDA_CLOCK();
  float _pacc[16];
  PRAGMA_UNROLL
  for (int i = 0; i < 16; ++i) _pacc[i] = 0.0f;
#define PHASE(i) do { const long _n = KDA_CLOCK(); _pacc[i] += (float)(_n - _pt); _pt = _n; } while (0)
#else
#define PHASE(i) do { } while (0)
#endif

  for (int idx = _tid; idx < K * BV; idx += NT) {
    const int r = idx / BV, c = idx % BV;
    sS[r * LDV + c] = HAS_INIT ? init_state[((long)(bb * Hn + h) * K + r) * V + v0 + c] : 0.0f;
  }

  const int nchunks = (L + BT - 1) / BT;
  int prev_t0 = 0, prev_lc = 0, next_t0 = 0, next_lc = 0;
  // raw loads of one chunk, 8 consecutive elements per thread; issued a chunk ahead
  Raw8<T> rq[NG], rk[NG], rf[NG], rv[NGV];
  float braw = 0.0f;
#define KDA_ISSUE_LOADS(T0, LC)                                                              \
  do {                                                                                       \
    PRAGMA_UNROLL                                                                            \
    for (int j = 0; j < NG; ++j) {                                                           \
      const int r = (_tid + j * NT) / G8;                                                    \
      if (r < (LC)) {                                                                        \
        const long gi = ((long)(bb * L + (T0) + r) * Hn + h) * K + c8;                       \
        ld8(rq[j], q_raw + gi);                                                              \
        ld8(rk[j], k_raw + gi);                                                              \
        ld8(rf[j], f + gi);                                                                  \
      } else {                                                                               \
        zero8(rq[j]);                                                                        \
        zero8(rk[j]);                                                                        \
        zero8(rf[j]);                                                                        \
      }                                                                                      \
    }                                                                                        \
    PRAGMA_UNROLL                                                                            \
    for (int j = 0; j < NGV; ++j) {                                                          \
      const int gv = _tid + j * NT;                                                          \
      const int r = gv / (BV / 8);                                                           \
      if (gv < NV8 && r < (LC)) {                                                            \
        ld8(rv[j], v + ((long)(bb * L + (T0) + r) * Hn + h) * V + v0 + (gv % (BV / 8)) * 8); \
      } else {                                                                               \
        zero8(rv[j]);                                                                        \
      }                                                                                      \
    }                                                                                        \
    braw = _tid < (LC) ? static_cast<float>(b_raw[(long)(bb * L + (T0) + _tid) * Hn + h]) : 0.0f; \
  } while (0)
  if (PF) KDA_ISSUE_LOADS(0, (L < BT ? L : BT));
  for (int ch = 0; ch < nchunks; ++ch) {
    const int t0 = ch * BT;
    const int Lc = (L - t0) < BT ? (L - t0) : BT;

    // P1: (with PF, this chunk's loads were issued during the previous chunk) write the previous
    // chunk's output, then L2-normalise q and k (q also takes K^-1/2) and turn f into the log
    // decay g, straight into tile memory.
    if (!PF) KDA_ISSUE_LOADS(t0, Lc);
    {
      for (int idx = _tid; idx < prev_lc * BV; idx += NT) {
        const int r = idx / BV, c = idx % BV;
        o[((long)(bb * L + prev_t0 + r) * Hn + h) * V + v0 + c] = static_cast<T>(sA[r * LDA + c]);
      }
      PRAGMA_UNROLL
      for (int j = 0; j < NG; ++j) {
        const int r = (_tid + j * NT) / G8;
        float sq = 0.0f, sk = 0.0f;
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) {
          sq += get8(rq[j], i) * get8(rq[j], i);
          sk += get8(rk[j], i) * get8(rk[j], i);
        }
        PRAGMA_UNROLL
        for (int m = 1; m < G8; m <<= 1) {
          sq += SHFL_XOR(sq, m);
          sk += SHFL_XOR(sk, m);
        }
        const float nq = RSQRTF(sq + 1e-6f) * qscale;
        const float nk = RSQRTF(sk + 1e-6f);
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) {
          sQ[r * LDK + c8 + i] = get8(rq[j], i) * nq;
          sK[r * LDK + c8 + i] = get8(rk[j], i) * nk;
          const float gv = r < Lc ? -a_h * kda_softplus(get8(rf[j], i) + dtb[i]) : 0.0f;
          sG[r * LDK + c8 + i] = gv;
          sE[r * LDK + c8 + i] = EXPF(gv);   // exp(g) for the diagonal blocks (sE/sF are free)
        }
      }
      if (_tid < BT) sBeta[_tid] = _tid < Lc ? kda_sigmoid(braw) : 0.0f;
    }
    BARRIER();
    PHASE(0);

    // P2: beta*v slice; in-chunk cumulative gate G (a thread per channel, loads first)
    PRAGMA_UNROLL
    for (int j = 0; j < NGV; ++j) {
      const int gv = _tid + j * NT;
      if (gv < NV8) {
        const int r = gv / (BV / 8), c = (gv % (BV / 8)) * 8;
        const float be = sBeta[r];
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) sV[r * LDV + c + i] = get8(rv[j], i) * be;
      }
    }
    if (_tid < K) {
      const int d = _tid;
      float run = 0.0f;
      PRAGMA_UNROLL
      for (int half = 0; half < 2; ++half) {
        float gl[BT / 2];
        PRAGMA_UNROLL
        for (int r = 0; r < BT / 2; ++r) gl[r] = sG[(half * BT / 2 + r) * LDK + d];
        PRAGMA_UNROLL
        for (int r = 0; r < BT / 2; ++r) {
          const int rr = half * BT / 2 + r;
          run += gl[r];
          sG[rr * LDK + d] = run;
          if ((rr & 15) == 15) sR[(rr >> 4) * K + d] = run;
        }
      }
      sGam[d] = EXPF(run);
    }
    BARRIER();
    PHASE(1);

    // per-thread references of its channel: R_0 = 0, R_i = G at row 16i-1 (R_4 = G_last)
    const float R1 = sR[ed], R2 = sR[K + ed], R3 = sR[2 * K + ed], R4 = sR[3 * K + ed];

    // P3: diagonal 16x16 blocks of Akk and Aqk (a warp per block and column pair)
    for (int task = _warp; task < 32; task += NW) {
      kda_diag_pair<K, LDK, LDA>(sQ, sK, sE, sA, sP, (task >> 3) * 16, task & 7, _lane);
    }
    BARRIER();
    PHASE(2);

    // P4: scaled operands. Row t of sub-block i: q*exp(G_t-R_i) (in place), k*exp(G_t-R_i) -> sG,
    // k*exp(R_{i+1}-G_t) -> sK: every exponent <= 0. Blocks two or three apart need the
    // k rows moved to a later reference, by exp(R_i - R_{j+1}) <= 1: copies in sE (over exp(g)).
    {
      const float f21 = EXPF(R2 - R1), f31 = EXPF(R3 - R1), f32 = EXPF(R3 - R2);
      PRAGMA_UNROLL
      for (int blk = 0; blk < 4; ++blk) {
        const float Ri = blk == 0 ? 0.0f : (blk == 1 ? R1 : (blk == 2 ? R2 : R3));
        const float Rn = blk == 0 ? R1 : (blk == 1 ? R2 : (blk == 2 ? R3 : R4));
        PRAGMA_UNROLL
        for (int jj = 0; jj < 16 / RS; ++jj) {
          const int t = blk * 16 + er + jj * RS;
          const float gt = sG[t * LDK + ed];
          const float e0 = EXPF(gt - Ri);
          const float kk = sK[t * LDK + ed];
          const float kb = kk * EXPF(Rn - gt);
          sQ[t * LDK + ed] *= e0;
          sG[t * LDK + ed] = kk * e0;
          sK[t * LDK + ed] = kb;
          if (blk == 0) {
            sE[t * LDK + ed] = kb * f21;              // rows 0-15: block 0 at R_2
            sE[(t + 16) * LDK + ed] = kb * f31;       // rows 16-31: block 0 at R_3
          }
          if (blk == 1) sE[(t + 16) * LDK + ed] = kb * f32;  // rows 32-47: block 1 at R_3
        }
      }
    }
    BARRIER();
    PHASE(3);

    // P5: all blocks below the diagonal in one phase: (row block i, column block j) from the
    // k rows of block j at reference R_i (sK for j = i-1, the sE copies otherwise)
    {
      DEVP float* Bt[6] = {sK, sK + 16 * LDK, sK + 32 * LDK, sE, sE + 32 * LDK, sE + 16 * LDK};
      const int bi[6] = {1, 2, 3, 2, 3, 3};
      const int bj[6] = {0, 1, 2, 0, 1, 0};
      PRAGMA_UNROLL
      for (int pr = 0; pr < 6; ++pr) {
        gemm_job<PI, 1, false, true, 0, 0, false, false>(_warp, NW, 4 * pr, sG + bi[pr] * 16 * LDK, LDK,
            Bt[pr], LDK, 16, 16, K, sA, LDA, 1.0f, sA + bi[pr] * 16 * LDA + bj[pr] * 16, LDA, 1.0f);
        gemm_job<PI, 1, false, true, 0, 0, false, false>(_warp, NW, 4 * pr + 2, sQ + bi[pr] * 16 * LDK, LDK,
            Bt[pr], LDK, 16, 16, K, sP, LDA, 1.0f, sP + bi[pr] * 16 * LDA + bj[pr] * 16, LDA, 1.0f);
      }
    }
    BARRIER();
    PHASE(4);

    // P6: k rows to the last reference (exp(G_last - G) k), Gamma*q, beta*Gamma*k (exp(R_i) <= 1),
    // and L = diag(beta) Akk below the diagonal
    {
      const float l0 = EXPF(R4 - R1), l1 = EXPF(R4 - R2), l2 = EXPF(R4 - R3);
      PRAGMA_UNROLL
      for (int blk = 0; blk < 4; ++blk) {
        const float eR = blk == 0 ? 1.0f : EXPF(blk == 1 ? R1 : (blk == 2 ? R2 : R3));
        const float lf = blk == 0 ? l0 : (blk == 1 ? l1 : l2);
        PRAGMA_UNROLL
        for (int jj = 0; jj < 16 / RS; ++jj) {
          const int t = blk * 16 + er + jj * RS;
          if (blk < 3) sK[t * LDK + ed] *= lf;
          sQ[t * LDK + ed] *= eR;
          sG[t * LDK + ed] *= eR * sBeta[t];
        }
      }
      PRAGMA_UNROLL
      for (int j = 0; j < BT * BT / NT; ++j) {
        const int idx = _tid + j * NT;
        const int t = idx / BT, s = idx % BT;
        if (s < t) sA[t * LDA + s] *= sBeta[t];
      }
    }
    BARRIER();
    PHASE(5);

    // P11..P15: M = (I + L)^-1. With D = the inverses of the diagonal 16x16 blocks and
    // E = D L (strictly block-lower, E^4 = 0): M = (I - E + E^2 - E^3) D, i.e. D on the
    // diagonal blocks and -E (I + R2) D below them, R2 = -E + E^2; every warp takes part.
    // P11: D by warps 0-1 (a lane per column), while the other warps do the products that need
    // only the old state: Y = beta*V - (beta*Gamma*k) S (in place in sV), O1 = (Gamma*q) S (in
    // place over sQ).
    if (_warp < 2) {
      const int base = (_warp * 2 + (_lane >> 4)) * 16;
      const int c = _lane & 15;
      float n[16];
      PRAGMA_UNROLL
      for (int r = 0; r < 16; ++r) {
        float acc = 0.0f;
        PRAGMA_UNROLL
        for (int m = 0; m < r; ++m) acc += sA[(base + r) * LDA + base + m] * n[m];
        n[r] = r < c ? 0.0f : (r == c ? 1.0f : -acc);
      }
      WARP_SYNC();
      PRAGMA_UNROLL
      for (int r = 0; r < 16; ++r) sA[(base + r) * LDA + base + c] = n[r];
    } else {
      gemm_job<PS, 2, false, false, 0, 0, true, false>(_warp - 2, NW - 2, 0, sG, LDK, sS, LDV,
          BT, BV, K, sV, LDV, -1.0f, sV, LDV, -1.0f);
      // one task per row block covers all BV columns, so writing O1 over those rows of sQ is safe
      gemm_job<PS, BV / 8, false, false, 0, 0, false, false>(_warp - 2, NW - 2, (BT / 16) * (BV / 16),
          sQ, LDK, sS, LDV, BT, BV, K, sQ, LDK, 1.0f, sQ, LDK, 1.0f);
    }
    BARRIER();
    PHASE(6);
    // P12: E = D L   (D: diagonal blocks of sA, L: the blocks below them)
    gemm_job<PI, 1, false, false, 3, 2, false, false>(_warp, NW, 0, sA, LDA, sA, LDA,
        BT, BT, BT, sE, LDA, 1.0f, sE, LDA, 1.0f);
    BARRIER();
    // P13: R2 = E E - E
    gemm_job<PI, 1, false, false, 2, 2, true, false>(_warp, NW, 0, sE, LDA, sE, LDA,
        BT, BT, BT, sE, LDA, -1.0f, sF, LDA, 1.0f);
    BARRIER();
    // P14: W = (I + R2) D over sF: below the diagonal R2 D (a task per 16x16 tile, in place),
    // the diagonal blocks D copied from sA
    gemm_job<PI, 2, false, false, 0, 3, false, true>(_warp, NW, 0, sF, LDA, sA, LDA,
        BT, BT, BT, sF, LDA, 1.0f, sF, LDA, 1.0f);
    PRAGMA_UNROLL
    for (int j = 0; j < 4 * 256 / NT + (4 * 256 % NT ? 1 : 0); ++j) {
      const int idx = _tid + j * NT;
      if (idx < 4 * 256) {
        const int bi = idx >> 8, r = (idx >> 4) & 15, c = idx & 15;
        sF[(bi * 16 + r) * LDA + bi * 16 + c] = sA[(bi * 16 + r) * LDA + bi * 16 + c];
      }
    }
    BARRIER();
    // P15: M below the diagonal blocks = -E W = (-E + E^2 - E^3) D (the diagonal blocks are D)
    gemm_job<PI, 1, false, false, 2, 1, false, true>(_warp, NW, 0, sE, LDA, sF, LDA,
        BT, BT, BT, sA, LDA, 1.0f, sA, LDA, -1.0f);
    BARRIER();
    PHASE(7);

    // P19: U = M Y; the state decays by Gamma_last
    gemm_job<PS, 2, false, false, 1, 0, false, false>(_warp, NW, 0, sA, LDA, sV, LDV,
        BT, BV, BT, sU, LDV, 1.0f, sU, LDV, 1.0f);
    for (int idx = _tid; idx < K * BV; idx += NT) {
      const int r = idx / BV, c = idx % BV;
      sS[r * LDV + c] *= sGam[r];
    }
    BARRIER();
    PHASE(9);

    // P20: O = O1 + Aqk U (staged in sA); S += (exp(G_last-G) k)^T U; with PF the next chunk's
    // loads go out first and arrive during this phase
    if (PF && ch + 1 < nchunks) {
      next_t0 = t0 + BT;
      next_lc = (L - next_t0) < BT ? (L - next_t0) : BT;
      KDA_ISSUE_LOADS(next_t0, next_lc);
    }
    gemm_job<PS, 2, false, false, 1, 0, true, false>(_warp, NW, 0, sP, LDA, sU, LDV,
        BT, BV, BT, sQ, LDK, 1.0f, sA, LDA, 1.0f);
    gemm_job<PS, 2, true, false, 0, 0, true, false>(_warp, NW, (BT / 16) * (BV / 16), sK, LDK, sU, LDV,
        K, BV, BT, sS, LDV, 1.0f, sS, LDV, 1.0f);
    BARRIER();
    PHASE(10);
    prev_t0 = t0;
    prev_lc = Lc;
  }

  for (int idx = _tid; idx < prev_lc * BV; idx += NT) {
    const int r = idx / BV, c = idx % BV;
    o[((long)(bb * L + prev_t0 + r) * Hn + h) * V + v0 + c] = static_cast<T>(sA[r * LDA + c]);
  }
  for (int idx = _tid; idx < K * BV; idx += NT) {
    const int r = idx / BV, c = idx % BV;
    state_out[((long)(bb * Hn + h) * K + r) * V + v0 + c] = sS[r * LDV + c];
  }
#ifdef KDA_PROF
  PHASE(11);
  if (_tid == 0) {
    const long tg = ((long)_gz * Hn + _gy) * (V / BV) + _gx;
    PRAGMA_UNROLL
    for (int i = 0; i < 16; ++i) prof[tg * 16 + i] = _pacc[i];
  }
#endif
"""

# ---------------------------------------------------------------------------------------------
# Decode body: one token. Threadgroup = (v-slice of BVD columns, head, batch); NTD threads =
# BVD columns x RG row groups, each thread keeps K/RG state rows of its column in registers.
# Template: T, K, V, BVD, NTD, GATED (fused gated RMSNorm of o; needs BVD == V).
# Inputs: q_raw, k_raw, f [B,H,K]; v [B,H,V]; b_raw [B,H]; dt_bias [H*K]; A_log [H];
# state [B,H,K,V] fp32; norm_w [V]; gate [B,H,V] (raw logits; 1-element dummies when not GATED);
# eps [1] fp32. Outputs: o [B,H,V] (T), state_out [B,H,K,V] fp32.
DECODE_BODY = r"""
/*@PROLOGUE@*/
  constexpr int RG = NTD / BVD;
  constexpr int RPT = K / RG;
  constexpr int NWD = NTD / 32;
  static_assert(NTD % BVD == 0 && K % RG == 0 && NWD >= 2 && BVD % 32 == 0, "decode shape");
  static_assert(!GATED || BVD == V, "gated norm needs the whole row");
  SHARED_ARR(float, sq, K);
  SHARED_ARR(float, sk, K);
  SHARED_ARR(float, se, K);
  SHARED_ARR(float, red, NTD);
  SHARED_ARR(float, misc, 4 + NWD);

  const int Hn = (int)q_raw_shape[1];
  const int v0 = _gx * BVD;
  const int h = _gy;
  const int bb = _gz;
  const long bh = (long)bb * Hn + h;
  const int col = _tid % BVD;
  const int rg = _tid / BVD;

  for (int d = _tid; d < K; d += NTD) {
    sq[d] = static_cast<float>(q_raw[bh * K + d]);
    sk[d] = static_cast<float>(k_raw[bh * K + d]);
    se[d] = EXPF(-EXPF(A_log[h]) * kda_softplus(static_cast<float>(f[bh * K + d]) + dt_bias[h * K + d]));
  }
  BARRIER();
  if (_warp < 2) {
    float ss = 0.0f;
    for (int d = _lane; d < K; d += 32) {
      const float x = _warp == 0 ? sq[d] : sk[d];
      ss += x * x;
    }
    ss = WARP_SUM(ss);
    if (_lane == 0) misc[_warp] = RSQRTF(ss + 1e-6f) * (_warp == 0 ? RSQRTF((float)K) : 1.0f);
  }
  if (_tid == 0) misc[2] = kda_sigmoid(static_cast<float>(b_raw[bh]));
  BARRIER();
  const float qn = misc[0], kn = misc[1], beta = misc[2];

  // decay, then S^T k over this thread's rows
  float s[RPT];
  float dot = 0.0f;
  const long sbase = bh * K * V + v0 + col;
  PRAGMA_UNROLL
  for (int j = 0; j < RPT; ++j) {
    const int kr = rg * RPT + j;
    s[j] = state[sbase + (long)kr * V] * se[kr];
    dot += s[j] * sk[kr];
  }
  red[_tid] = dot * kn;
  BARRIER();
  float tot = 0.0f;
  PRAGMA_UNROLL
  for (int r = 0; r < RG; ++r) tot += red[r * BVD + col];
  const float u = beta * (static_cast<float>(v[bh * V + v0 + col]) - tot);
  float op = 0.0f;
  const float ukn = u * kn;
  PRAGMA_UNROLL
  for (int j = 0; j < RPT; ++j) {
    const int kr = rg * RPT + j;
    s[j] += sk[kr] * ukn;
    op += s[j] * sq[kr];
    state_out[sbase + (long)kr * V] = s[j];
  }
  BARRIER();
  red[_tid] = op * qn;
  BARRIER();
  float ov = 0.0f;
  PRAGMA_UNROLL
  for (int r = 0; r < RG; ++r) ov += red[r * BVD + col];
  if (GATED) {
    // RMSNorm over the head's V outputs, times weight and sigmoid(gate)
    float sq2 = rg == 0 ? ov * ov : 0.0f;
    sq2 = WARP_SUM(sq2);
    if (_lane == 0) misc[4 + _warp] = sq2;
    BARRIER();
    float ms = 0.0f;
    for (int w = 0; w < NWD; ++w) ms += misc[4 + w];
    ov = ov * RSQRTF(ms / (float)V + eps[0]) * static_cast<float>(norm_w[col]) *
         kda_sigmoid(static_cast<float>(gate[bh * V + col]));
  }
  if (rg == 0) o[bh * V + v0 + col] = static_cast<T>(ov);
"""


def _body(dialect: Dialect, text: str, with_smem: bool) -> str:
    text = text.replace("/*@PROLOGUE@*/", dialect.prologue)
    if with_smem:
        text = text.replace("/*@SMEM@*/", dialect.smem)
    return text


def render(dialect: Dialect, kind: str, prof: bool = False, max_threads: int = 0) -> tuple[str, str]:
    """(header, body) of kernel `kind` ('prefill' or 'decode') in `dialect`. prof: the prefill
    also writes per-phase clock counts of thread 0 to an extra output `prof` (CUDA).
    max_threads: CUDA launch bound for blocks of more than 256 threads (caps registers at
    65536 / max_threads; MLX writes the signature, so it goes in through __global__)."""
    header = ("#define KDA_PROF 1\n" if prof else "") + dialect.header + COMMON_HEADER
    if dialect.name == "cuda" and max_threads > 256:
        header += ("#undef __global__\n"
                   f"#define __global__ __location__(global) __launch_bounds__({max_threads}, 1)\n")
    if kind == "prefill":
        return header, _body(dialect, PREFILL_BODY, True)
    if kind == "decode":
        return header, _body(dialect, DECODE_BODY, False)
    raise ValueError(kind)


PREFILL_INPUTS = ["q_raw", "k_raw", "v", "f", "b_raw", "dt_bias", "A_log", "init_state"]
DECODE_INPUTS = ["q_raw", "k_raw", "v", "f", "b_raw", "dt_bias", "A_log", "state",
                 "norm_w", "gate", "eps"]


def prefill_outputs(dialect: Dialect, prof: bool = False) -> list[str]:
    return (["o", "state_out"] + (["scratch"] if dialect.scratch_output else [])
            + (["prof"] if prof else []))


DECODE_OUTPUTS = ["o", "state_out"]


def prefill_smem_floats(K: int, BV: int) -> int:
    """Tile memory per threadgroup, in floats (mirrors OFF_END in PREFILL_BODY)."""
    BT = 64
    LDK, LDV, LDA = K + 8, BV + 8, BT + 8
    return 3 * BT * LDK + 2 * BT * LDV + K * LDV + 4 * BT * LDA + 4 * K + K + BT
