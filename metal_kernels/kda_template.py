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

// Diagonal 16x16 blocks of Aqk (t >= s) and Akk (t > s) in 4x4 sub-tiles, a warp per task,
// lanes over channels; each lane keeps its channel's few rows in registers, and the 32 sums
// (16 of Aqk, 16 of Akk) are reduced across lanes in one transpose-reduction.
// kda_diag_off: sub-tile (row sub-block ti > column sub-block sj) of the diagonal block at
// `base`. Reference r = the last row of sub-block sj: k_s exp(G_r - G_s) (a running product of
// exp(g), sAe, up from r) and x_t exp(G_t - G_r) (exp(G_{t0-1} - G_r), then a running product
// down from t0): every exponent <= 0.
template <int KD, int LDK_, int LDA_, typename PT>
DFN void kda_diag_off(PT sQ, PT sK, PT sG, PT sAe, PT sA, PT sP, PT sBeta, int base, int ti,
                      int sj, int lane) {
  float acc[32];
  PRAGMA_UNROLL
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  const int r = base + 4 * sj + 3;
  const int t0 = base + 4 * ti;
  PRAGMA_UNROLL2   // (not 4: instruction footprint)
  for (int d = lane; d < KD; d += 32) {
    float kb[4];
    kb[3] = sK[r * LDK_ + d];
    float e = sAe[r * LDK_ + d];
    kb[2] = sK[(r - 1) * LDK_ + d] * e;
    e *= sAe[(r - 1) * LDK_ + d];
    kb[1] = sK[(r - 2) * LDK_ + d] * e;
    e *= sAe[(r - 2) * LDK_ + d];
    kb[0] = sK[(r - 3) * LDK_ + d] * e;
    float a = ti == sj + 1 ? 1.0f : EXPF(sG[(t0 - 1) * LDK_ + d] - sG[r * LDK_ + d]);
    PRAGMA_UNROLL
    for (int u = 0; u < 4; ++u) {
      a *= sAe[(t0 + u) * LDK_ + d];
      const float qa = sQ[(t0 + u) * LDK_ + d] * a;
      const float ka = sK[(t0 + u) * LDK_ + d] * a;
      PRAGMA_UNROLL
      for (int v = 0; v < 4; ++v) {
        acc[u * 4 + v] += qa * kb[v];
        acc[16 + u * 4 + v] += ka * kb[v];
      }
    }
  }
  kda_tr_reduce(acc, lane);
  // lane l holds sum l: Aqk (l < 16) or Akk, row t0 + (l >> 2) % 4, column base + 4 sj + l % 4;
  // Akk is stored as L = beta_t Akk
  const int t = t0 + ((lane >> 2) & 3);
  if (lane >= 16) {
    sA[t * LDA_ + base + 4 * sj + (lane & 3)] = acc[0] * sBeta[t];
  } else {
    sP[t * LDA_ + base + 4 * sj + (lane & 3)] = acc[0];
  }
}

// kda_diag_self2: two 4x4 sub-tiles on the diagonal (rows = columns = t0a.., t0b..), exp(G_t - G_s)
// (t >= s, 3 rows at most) as products of exp(g). Sums i = 0..9: Aqk at (t, s) with t >= s,
// i = 10..15: Akk at t > s (the tables below, 2 bits an entry); each lane also writes the zero
// at the transposed place of the other matrix, which covers both upper triangles.
#define KDA_SELF_T 0xfe9ffa94u
#define KDA_SELF_S 0x910e4910u
template <int KD, int LDK_, int LDA_, typename PT>
DFN void kda_diag_self2(PT sQ, PT sK, PT sAe, PT sA, PT sP, PT sBeta, int t0a, int t0b, int lane) {
  float acc[32];
  PRAGMA_UNROLL
  for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
  PRAGMA_UNROLL2
  for (int d = lane; d < KD; d += 32) {
    PRAGMA_UNROLL
    for (int hh = 0; hh < 2; ++hh) {
      const int t0 = hh == 0 ? t0a : t0b;
      const float q0 = sQ[t0 * LDK_ + d], q1 = sQ[(t0 + 1) * LDK_ + d];
      const float q2 = sQ[(t0 + 2) * LDK_ + d], q3 = sQ[(t0 + 3) * LDK_ + d];
      const float k0 = sK[t0 * LDK_ + d], k1 = sK[(t0 + 1) * LDK_ + d];
      const float k2 = sK[(t0 + 2) * LDK_ + d], k3 = sK[(t0 + 3) * LDK_ + d];
      const float e1 = sAe[(t0 + 1) * LDK_ + d], e2 = sAe[(t0 + 2) * LDK_ + d];
      const float e3 = sAe[(t0 + 3) * LDK_ + d];
      const float k0e1 = k0 * e1, k1e2 = k1 * e2, k2e3 = k2 * e3;   // k_s exp(G_{s+1} - G_s)
      const float k0e2 = k0e1 * e2, k1e3 = k1e2 * e3, k0e3 = k0e2 * e3;
      const int o = 16 * hh;
      acc[o + 0] += q0 * k0;
      acc[o + 1] += q1 * k0e1;
      acc[o + 2] += q1 * k1;
      acc[o + 3] += q2 * k0e2;
      acc[o + 4] += q2 * k1e2;
      acc[o + 5] += q2 * k2;
      acc[o + 6] += q3 * k0e3;
      acc[o + 7] += q3 * k1e3;
      acc[o + 8] += q3 * k2e3;
      acc[o + 9] += q3 * k3;
      acc[o + 10] += k1 * k0e1;
      acc[o + 11] += k2 * k0e2;
      acc[o + 12] += k2 * k1e2;
      acc[o + 13] += k3 * k0e3;
      acc[o + 14] += k3 * k1e3;
      acc[o + 15] += k3 * k2e3;
    }
  }
  kda_tr_reduce(acc, lane);
  const int i = lane & 15;
  const int t0 = lane < 16 ? t0a : t0b;
  const int t = (int)((KDA_SELF_T >> (2 * i)) & 3u), s = (int)((KDA_SELF_S >> (2 * i)) & 3u);
  const bool is_k = i >= 10;
  DEVP float* dst = is_k ? sA : sP;
  DEVP float* zer = is_k ? sP : sA;
  dst[(t0 + t) * LDA_ + t0 + s] = is_k ? acc[0] * sBeta[t0 + t] : acc[0];   // L = beta_t Akk
  zer[(t0 + s) * LDA_ + t0 + t] = 0.0f;
}

// x'[i] = x[(i + rot) % 8]: with rot = (lane / 4) % 8, the 8-channel groups of the chunk load
// go to tile memory without bank conflicts (rows are 8 floats past a multiple of 32 apart)
DFN void kda_rot8(TH float* x, int rot) {
  float y[8];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) y[i] = (rot & 1) ? x[(i + 1) & 7] : x[i];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) x[i] = (rot & 2) ? y[(i + 2) & 7] : y[i];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) y[i] = (rot & 4) ? x[(i + 4) & 7] : x[i];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) x[i] = y[i];
}

// 8 channels x[0..8) (in order) to dst[0..8) in the rotated order of kda_rot8 (x is rotated in
// place); kda_take8 is the reverse
template <typename PT>
DFN void kda_put8(PT dst, TH float* x, int rot) {
  kda_rot8(x, rot);
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) dst[(i + rot) & 7] = x[i];
}
template <typename PT>
DFN void kda_take8(PT src, TH float* x, int rot) {
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) x[i] = src[(i + rot) & 7];
  kda_rot8(x, (8 - rot) & 7);
}

// SPLIT: where 8-element group g of an xs item lives in tile memory: groups 0..3*64*G8-1 are
// the rows of sG, sQ, sK (G8 groups a row), then the rows of sA and sP (8 groups a row)
template <typename PT>
DFN PT kda_item_tile(PT smem, int g, int offG, int offQ, int offK, int offA, int offP, int ldk,
                     int lda, int g8) {
  const int nk = 64 * g8;
  if (g < 3 * nk) {
    const int t = g / nk, rem = g - t * nk;
    return smem + (t == 0 ? offG : (t == 1 ? offQ : offK)) + (rem / g8) * ldk + (rem % g8) * 8;
  }
  const int rem = g - 3 * nk, t = rem / 512, r2 = rem - t * 512;
  return smem + (t == 0 ? offA : offP) + (r2 / 8) * lda + (r2 % 8) * 8;
}

DFN float kda_sigmoid(float x) { return 1.0f / (1.0f + EXPF(-x)); }
// softplus, linear above 20 (as torch)
DFN float kda_softplus(float x) { return x > 20.0f ? x : LOGF(1.0f + EXPF(x)); }
// Channel c of a decode token's causal short conv, silu'd and rounded to T (what the unfused layer
// hands the kernel): x [B, C] the token's projections, cs [B, KC - 1, C] the previous inputs, w [C, KC].
// write: also the shifted state into cs_out (the same layout as cs).
template <typename T, int KC, typename PX, typename PS, typename PW, typename PO>
DFN float kda_conv_silu(PX x, PS cs, PW w, PO cs_out, long bb, int C, int c, bool write) {
  const long base = bb * (KC - 1) * (long)C + c;
  const float xn = static_cast<float>(x[bb * C + c]);
  float acc = xn * static_cast<float>(w[(long)c * KC + KC - 1]);
  PRAGMA_UNROLL
  for (int j = 0; j < KC - 1; ++j) {
    const float p = static_cast<float>(cs[base + (long)j * C]);
    acc += p * static_cast<float>(w[(long)c * KC + j]);
    if (write && j > 0) cs_out[base + (long)(j - 1) * C] = static_cast<T>(p);
  }
  if (write) cs_out[base + (long)(KC - 2) * C] = x[bb * C + c];
  return static_cast<float>(static_cast<T>(acc * kda_sigmoid(acc)));
}
"""

# ---------------------------------------------------------------------------------------------
# Prefill body. Template constants: T (input dtype), K, V, BV, NT (threads), HAS_INIT, PI
# (precision of the intra-chunk products), PS (precision of the state products), PF (issue the
# next chunk's global loads a chunk ahead; costs registers), SPLIT, TS (dtype of the shared
# intra-chunk results), LA (SPLIT: how many chunks ahead a threadgroup may claim), SMEM_FLOATS.
# Inputs: q_raw, k_raw, f [B,L,H,K]; v [B,L,H,V]; b_raw [B,L,H]; dt_bias [H*K]; A_log [H];
# init_state [B,H,K,V] fp32 (any 1-element array when HAS_INIT is false); sync int32.
# Outputs: o [B,L,H,V] (T), state_out [B,H,K,V] fp32, xs (TS), xf fp32 (+ scratch on Metal).
#
# SPLIT: the V/BV threadgroups of a (batch, head) share the intra-chunk work instead of each
# repeating it. A threadgroup claims chunk items in order from a counter (sync[bh][0]), runs a
# claimed item's intra-chunk phases and publishes the results (xs: beta*Gamma*k, Gamma*q,
# exp(G_last - G)*k, M, Aqk; xf: Gamma_last, beta) with a flag (sync[bh][1 + item]); the state
# pass of chunk c reads item c back. A threadgroup claims any item it needs now, and items up
# to LA ahead: one per chunk, or more while the item it needs is still being made elsewhere. It
# only ever waits for an item that a running threadgroup has claimed: no deadlock, whatever the
# residency. Every sync slot starts at one value the caller picks per call (mx.full; the last
# slot keeps it): no memset, and mx.compile cannot merge two calls' sync arrays.
# Without SPLIT, each threadgroup runs every chunk's intra-chunk work itself (xs, xf, sync are
# 1-element dummies).
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
  // SPLIT: one item of xs = 3 tiles BT x K, then M and Aqk (BT x BT), 8-element groups in order
  constexpr int NX8 = 3 * BT * G8 + 2 * BT * (BT / 8);
  constexpr int XS_ITEM = 8 * NX8;
  constexpr int XF_ITEM = K + BT;               // Gamma_last, beta (= tile memory at OFF_GAM)
  constexpr int XB = 16 / (int)sizeof(TS);      // groups a thread holds in registers at once
  static_assert(!SPLIT || (NX8 % NT == 0 && !PF), "split layout");
  SHARED_ARR(int, sCmd, 2);                     // SPLIT: thread 0's decision for the step
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
  const int rot = (_lane >> 2) & 7;        // chunk load: element order (see kda_rot8)
  float dtb[8];
  PRAGMA_UNROLL
  for (int i = 0; i < 8; ++i) dtb[i] = dt_bias[h * K + c8 + ((i + rot) & 7)];
#ifdef KDA_PROF
  long _pt = KDA_CLOCK();
  float _pacc[16];
  PRAGMA_UNROLL
  for (int i = 0; i < 16; ++i) _pacc[i] = 0.0f;
#define PHASE(i) do { const long _n = KDA_CLOCK(); _pacc[i] += (float)(_n - _pt); _pt = _n; } while (0)
#else
#define PHASE(i) do { } while (0)
#endif
// SPLIT: this head's sync slots: the claim counter, then a flag per chunk
#define KDA_CLAIM (SYNC_PTR(sync) + bh * (nchunks + 1))
#define KDA_FLAG(c) (KDA_CLAIM + 1 + (c))

  for (int idx = _tid; idx < K * BV; idx += NT) {
    const int r = idx / BV, c = idx % BV;
    sS[r * LDV + c] = HAS_INIT ? init_state[((long)(bb * Hn + h) * K + r) * V + v0 + c] : 0.0f;
  }
  for (int idx = _tid; idx < BT * LDA; idx += NT) sP[idx] = 0.0f;

  const int nchunks = (L + BT - 1) / BT;
  const long bh = (long)bb * Hn + h;
  const int sync_e = SPLIT ? sync[(long)q_raw_shape[0] * Hn * (nchunks + 1)] : 0;
  int step = 0;
  int ch = 0;                // next chunk of the state pass
  bool ahead = false;        // SPLIT: claimed an item ahead since ch last moved
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
      if (!SPLIT && gv < NV8 && r < (LC)) {                                                  \
        ld8(rv[j], v + ((long)(bb * L + (T0) + r) * Hn + h) * V + v0 + (gv % (BV / 8)) * 8); \
      } else {                                                                               \
        zero8(rv[j]);                                                                        \
      }                                                                                      \
    }                                                                                        \
    braw = _tid < (LC) ? static_cast<float>(b_raw[(long)(bb * L + (T0) + _tid) * Hn + h]) : 0.0f; \
  } while (0)
  if (PF) KDA_ISSUE_LOADS(0, (L < BT ? L : BT));
  while (ch < nchunks) {
    // this step: the intra-chunk work of `item` (if >= 0), then the state pass of ch (if st)
    int item = ch;
    bool st = true;
    if (SPLIT) {
      if (_tid == 0) {
        // the counter first: the acquire load holds back the loads after it, not before
        const int c = sync_load(KDA_CLAIM) - sync_e;
        const bool ready = sync_load_acquire(KDA_FLAG(ch)) != sync_e;
        int cmd = ready ? -1 : -2;   // -2: wait, -1: the state pass of ch, >= 0: this item's intra work
        if (c < nchunks && (c <= ch || (c < ch + LA && (!ahead || !ready)))) {
          const int got = sync_add(KDA_CLAIM, 1) - sync_e;
          if (got < nchunks) cmd = got;
        }
        sCmd[step & 1] = cmd;
      }
      BARRIER();
      const int cmd = sCmd[step & 1];   // (double-buffered: the next write is a barrier away)
      ++step;
      PHASE(14);
      if (cmd == -2) {
        if (_tid == 0) SPIN_PAUSE();
        continue;
      }
      item = cmd;
      st = cmd == -1;
      if (cmd > ch) ahead = true;
    }
    if (item >= 0) {
    const int t0 = item * BT;
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
      PHASE(12);
      PRAGMA_UNROLL
      for (int j = 0; j < NG; ++j) {
        const int r = (_tid + j * NT) / G8;
        float xq[8], xk[8], xf[8];
        float sq = 0.0f, sk = 0.0f;
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) {
          xq[i] = get8(rq[j], i);
          xk[i] = get8(rk[j], i);
          xf[i] = get8(rf[j], i);
          sq += xq[i] * xq[i];
          sk += xk[i] * xk[i];
        }
        kda_rot8(xq, rot);
        kda_rot8(xk, rot);
        kda_rot8(xf, rot);
        PRAGMA_UNROLL
        for (int m = 1; m < G8; m <<= 1) {
          sq += SHFL_XOR(sq, m);
          sk += SHFL_XOR(sk, m);
        }
        const float nq = RSQRTF(sq + 1e-6f) * qscale;
        const float nk = RSQRTF(sk + 1e-6f);
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) {
          const int c = r * LDK + c8 + ((i + rot) & 7);
          sQ[c] = xq[i] * nq;
          sK[c] = xk[i] * nk;
          const float gv = r < Lc ? -a_h * kda_softplus(xf[i] + dtb[i]) : 0.0f;
          sG[c] = gv;
          sE[c] = EXPF(gv);   // exp(g) for the diagonal blocks (sE/sF are free)
        }
      }
      PHASE(13);
      if (_tid < BT) sBeta[_tid] = _tid < Lc ? kda_sigmoid(braw) : 0.0f;
    }
    BARRIER();
    PHASE(0);

    // the next chunk's raw inputs to L2 now, so that its loads in P1 do not wait for memory
    if (item + 1 < nchunks) {
      constexpr int EL = 128 / (int)sizeof(T);            // elements per 128-byte line
      constexpr int NLK = (K + EL - 1) / EL, NLV = SPLIT ? 0 : (BV + EL - 1) / EL;
      const int n0 = t0 + BT;
      const int nl = (L - n0) < BT ? (L - n0) : BT;
      for (int idx = _tid; idx < nl * (3 * NLK + NLV + 1); idx += NT) {
        const int r = idx % nl, w = idx / nl;
        const long row = (long)(bb * L + n0 + r) * Hn + h;
        if (w < 3 * NLK) {
          const int a = w / NLK, ln = w % NLK;
          PREFETCH_L2((a == 0 ? q_raw : (a == 1 ? k_raw : f)) + row * K + ln * EL);
        } else if (w < 3 * NLK + NLV) {
          PREFETCH_L2(v + row * V + v0 + (w - 3 * NLK) * EL);
        } else {
          PREFETCH_L2(b_raw + row);
        }
      }
    }

    // P2: beta*v slice; in-chunk cumulative gate G (a thread per channel, loads first)
    PRAGMA_UNROLL
    for (int j = 0; j < NGV; ++j) {
      const int gv = _tid + j * NT;
      if (!SPLIT && gv < NV8) {
        const int r = gv / (BV / 8), c = (gv % (BV / 8)) * 8;
        const float be = sBeta[r];
        float xv[8];
        PRAGMA_UNROLL
        for (int i = 0; i < 8; ++i) xv[i] = get8(rv[j], i) * be;
        kda_put8(sV + r * LDV + c, xv, rot);
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

    // P3: diagonal 16x16 blocks of Akk and Aqk in 4x4 sub-tiles: 24 tasks below the sub-tile
    // diagonal, 8 tasks of two sub-tiles on it (their upper triangles are zeroed there; the
    // sub-tiles above stay zero in sP from the start, and nothing reads them in sA)
    for (int task = _warp; task < 32; task += NW) {
      if (task < 24) {
        const int p = task % 6;
        kda_diag_off<K, LDK, LDA>(sQ, sK, sG, sE, sA, sP, sBeta, (task / 6) * 16,
                                  (int)((0xfb9u >> (2 * p)) & 3u), (int)((0x940u >> (2 * p)) & 3u), _lane);
      } else {
        const int b = task - 24;   // diagonal sub-tiles 2b, 2b+1 (rows 8b.., 8b+4..)
        kda_diag_self2<K, LDK, LDA>(sQ, sK, sE, sA, sP, sBeta, 8 * b, 8 * b + 4, _lane);
      }
    }
    BARRIER();
    PHASE(2);

    // P4: scaled operands. Row t of sub-block i: q*exp(G_t-R_i) (in place), beta*k*exp(G_t-R_i) -> sG
    // (so that the products below give L = diag(beta) Akk directly),
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
          sG[t * LDK + ed] = kk * e0 * sBeta[t];
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
    // (one code path for all 12 products: the loop body is long, and fewer inlined copies keep
    // the kernel's instruction footprint down)
    for (int task = _warp; task < 12; task += NW) {
      const int pr = task >> 1;
      const int bi = (int)((0xfb9u >> (2 * pr)) & 3u), bj = (int)((0x124u >> (2 * pr)) & 3u);
      DEVP float* Bt = pr < 3 ? sK + pr * 16 * LDK : sE + (pr == 3 ? 0 : (pr == 4 ? 32 : 16)) * LDK;
      DEVP float* Am = (task & 1) ? sQ : sG;
      DEVP float* Cm = (task & 1) ? sP : sA;
      gemm_job<PI, 2, false, true, 0, 0, false, false>(0, 1, 0, Am + bi * 16 * LDK, LDK, Bt, LDK,
          16, 16, K, Cm, LDA, 1.0f, Cm + bi * 16 * LDA + bj * 16, LDA, 1.0f);
    }
    BARRIER();
    PHASE(4);


    // P11..P14: M = (I + L)^-1. With D = the inverses of the diagonal 16x16 blocks and
    // E = D L (strictly block-lower, E^4 = 0): M = (I - E + E^2 - E^3) D, in two rounds of
    // 16x16 block products after D and E (P13, P14).
    // P11: D and E by block forward substitution, (I + L_ii) X = I or L_ij, a lane per column
    // (warps 0-4: 10 half-warp jobs), while the other warps do the products that need only the
    // old state: Y = beta*V - (beta*Gamma*k) S (in place in sV), O1 = (Gamma*q) S (in place over
    // sQ). D waits in sU (free until P19) for the barrier, as other lanes still read L_ii; E goes
    // to the blocks of sE below the diagonal (nothing reads the others).
    constexpr int NSUB = NW >= 16 ? 5 : 0;   // warps that only substitute (small blocks: all warps do both)
    for (int slot = _warp; slot < 5; slot += NW) {
      const int job = 2 * slot + (_lane >> 4), c = _lane & 15;
      // jobs 0-3: D_i; 4-9: E_ij, (i, j) = (1,0) (2,0) (3,0) (2,1) (3,1) (3,2)
      const int pj = job < 4 ? 0 : job - 4;
      const int bi = job < 4 ? job : (int)((0xfb9u >> (2 * pj)) & 3u);
      const int bj = job < 4 ? job : (int)((0x940u >> (2 * pj)) & 3u);
      float n[16];
      PRAGMA_UNROLL
      for (int r = 0; r < 16; ++r) {
        float acc = job < 4 ? (r == c ? 1.0f : 0.0f) : sA[(bi * 16 + r) * LDA + bj * 16 + c];
        PRAGMA_UNROLL
        for (int m = 0; m < r; ++m) acc -= sA[(bi * 16 + r) * LDA + bi * 16 + m] * n[m];
        n[r] = acc;
      }
      if (job < 4) {
        PRAGMA_UNROLL
        for (int r = 0; r < 16; ++r) sU[(bi * 16 + r) * LDV + c] = n[r];
      } else {
        PRAGMA_UNROLL
        for (int r = 0; r < 16; ++r) sE[(bi * 16 + r) * LDA + bj * 16 + c] = n[r];
      }
    }
    if (_warp >= NSUB) {
      // a warp per (row block i, product): first the rows to the chunk start, by exp(R_i) <= 1
      // (R_0 = 0): Gamma*q, beta*Gamma*k; then Y = beta*V - (beta*Gamma*k) S or O1 = (Gamma*q) S.
      // SPLIT leaves the products to the state pass; its last 3 tasks move the k rows of blocks
      // 0-2 to the last reference instead (P19 does that without SPLIT)
      for (int task = _warp - NSUB; task < 2 * (BT / 16) + (SPLIT ? 3 : 0); task += NW - NSUB) {
        if (task >= 2 * (BT / 16)) {
          const int blk = task - 2 * (BT / 16);
          for (int d = _lane; d < K; d += 32) {
            const float lf = EXPF(sR[3 * K + d] - sR[blk * K + d]);
            PRAGMA_UNROLL
            for (int r = 0; r < 16; ++r) sK[(blk * 16 + r) * LDK + d] *= lf;
          }
          continue;
        }
        const int i = task >> 1;
        DEVP float* X = (task & 1) ? sQ : sG;
        if (i > 0) {
          for (int d = _lane; d < K; d += 32) {
            const float e = EXPF(sR[(i - 1) * K + d]);
            PRAGMA_UNROLL
            for (int r = 0; r < 16; ++r) X[(i * 16 + r) * LDK + d] *= e;
          }
          WARP_SYNC();
        }
        if (SPLIT) continue;
        if (task & 1) {   // all BV columns in one task, so O1 can go over those rows of sQ
          gemm_job<PS, BV / 8, false, false, 0, 0, false, false>(0, 1, 0, sQ + i * 16 * LDK, LDK, sS, LDV,
              16, BV, K, sQ + i * 16 * LDK, LDK, 1.0f, sQ + i * 16 * LDK, LDK, 1.0f);
        } else {
          gemm_job<PS, BV / 8, false, false, 0, 0, true, false>(0, 1, 0, sG + i * 16 * LDK, LDK, sS, LDV,
              16, BV, K, sV + i * 16 * LDV, LDV, -1.0f, sV + i * 16 * LDV, LDV, -1.0f);
        }
      }
    }
    BARRIER();
    PHASE(6);
    // with PF, the next chunk's loads go out here (this chunk's raw values were used in P1-P2)
    // and arrive while the inverse, U and the state update run
    if (PF && !SPLIT && ch + 1 < nchunks) {
      next_t0 = t0 + BT;
      next_lc = (L - next_t0) < BT ? (L - next_t0) : BT;
      KDA_ISSUE_LOADS(next_t0, next_lc);
    }
    // P13: the products of the inverse that need only D and E, X_ij = E_ij D_j (below the
    // diagonal, into sF) and Z = E_32 E_21 (into sF's free block (0,1)); a warp per product
    for (int task = _warp; task < 7; task += NW) {
      const int xi = task < 6 ? (int)((0xfb9u >> (2 * task)) & 3u) : 0;
      const int xj = task < 6 ? (int)((0x940u >> (2 * task)) & 3u) : 1;
      DEVP float* Am = task < 6 ? sE + xi * 16 * LDA + xj * 16 : sE + 48 * LDA + 32;
      DEVP float* Bm = task < 6 ? sU + xj * 16 * LDV : sE + 32 * LDA + 16;
      gemm_job<PI, 2, false, false, 0, 0, false, false>(0, 1, 0, Am, LDA, Bm, task < 6 ? LDV : LDA,
          16, 16, 16, sF, LDA, 1.0f, sF + xi * 16 * LDA + xj * 16, LDA, 1.0f);
    }
    BARRIER();
    // P14: M = (I - E + E^2 - E^3) D by blocks: M_ii = D_i, M_10 = -X_10, M_21 = -X_21,
    // M_32 = -X_32, M_20 = -X_20 + E_21 X_10, M_31 = -X_31 + E_32 X_21,
    // M_30 = -X_30 + E_31 X_10 + E_32 X_20 - Z X_10 (three products in a row on one warp)
    {
      DEVP float* X10 = sF + 16 * LDA;
      DEVP float* M30 = sA + 48 * LDA;
      if (_warp < 3) {
        for (int step = 0; step < (_warp == 2 ? 3 : 1); ++step) {
          // warp 0: M_20; warp 1: M_31; warp 2: M_30 in three steps
          const int w = _warp + step;   // 0, 1, then 2, 3, 4
          DEVP float* Am = w == 0 ? sE + 32 * LDA + 16 : (w == 1 || w == 3 ? sE + 48 * LDA + 32
                           : (w == 2 ? sE + 48 * LDA + 16 : sF + 16));
          DEVP float* Bm = w == 1 ? sF + 32 * LDA + 16 : (w == 3 ? sF + 32 * LDA : X10);
          DEVP float* Ci = w == 0 ? sF + 32 * LDA : (w == 1 ? sF + 48 * LDA + 16 : (w == 2 ? sF + 48 * LDA : M30));
          DEVP float* Co = w == 0 ? sA + 32 * LDA : (w == 1 ? sA + 48 * LDA + 16 : M30);
          gemm_job<PI, 2, false, false, 0, 0, true, false>(0, 1, 0, Am, LDA, Bm, LDA, 16, 16, 16,
              Ci, LDA, w == 3 ? 1.0f : -1.0f, Co, LDA, w == 4 ? -1.0f : 1.0f);
          WARP_SYNC();
        }
      }
      for (int idx = _tid; idx < 7 * 256; idx += NT) {
        const int z = idx >> 8, r = (idx >> 4) & 15, c = idx & 15;
        if (z < 4) {
          sA[(z * 16 + r) * LDA + z * 16 + c] = sU[(z * 16 + r) * LDV + c];
        } else {
          const int zz = z - 3;   // blocks (1,0), (2,1), (3,2)
          sA[(zz * 16 + r) * LDA + (zz - 1) * 16 + c] = -sF[(zz * 16 + r) * LDA + (zz - 1) * 16 + c];
        }
      }
    }
    BARRIER();
    PHASE(7);
    if (SPLIT) {
      // publish the item: tiles to xs (8-element groups in the order of NX8), Gamma_last and
      // beta to xf, then its flag (after every thread's writes)
      DEVP TS* xo = xs + (bh * nchunks + item) * (long)XS_ITEM;
      for (int j0 = 0; j0 < NX8 / NT; j0 += XB) {
        PRAGMA_UNROLL
        for (int jj = 0; jj < XB; ++jj) {
          if (j0 + jj >= NX8 / NT) break;
          const int g = _tid + (j0 + jj) * NT;
          float x[8];
          kda_take8(kda_item_tile(smem, g, OFF_G, OFF_Q, OFF_K, OFF_A, OFF_P, LDK, LDA, G8), x, rot);
          st8<TS>(xo + (long)g * 8, x);
        }
      }
      for (int idx = _tid; idx < XF_ITEM; idx += NT) xf[(bh * nchunks + item) * XF_ITEM + idx] = smem[OFF_GAM + idx];
      BARRIER();
      // one release by thread 0 after the barrier covers every thread's writes (cumulativity)
      if (_tid == 0) sync_store_release(KDA_FLAG(item), sync_e + 1);
      PHASE(15);
    }
    }  // intra-chunk work of item
    if (!st) continue;
    const int t0 = ch * BT;
    const int Lc = (L - t0) < BT ? (L - t0) : BT;
    if (SPLIT) {
      // the state pass reads item ch back: tiles (sG: beta*Gamma*k, sQ: Gamma*q, sK: exp(G_last - G)k,
      // sA: M, sP: Aqk), Gamma_last and beta; then beta*v
      CDEVP TS* xi = xs + (bh * nchunks + ch) * (long)XS_ITEM;
      CDEVP float* xfi = xf + (bh * nchunks + ch) * XF_ITEM;
      // v, beta and xf go out first, so that their loads overlap the tiles'
      Raw8<T> rvs[NGV];
      float bes[NGV];
      PRAGMA_UNROLL
      for (int j = 0; j < NGV; ++j) {
        const int gv = _tid + j * NT, r = gv / (BV / 8);
        if (gv < NV8 && r < Lc) {
          ld8(rvs[j], v + ((long)(bb * L + t0 + r) * Hn + h) * V + v0 + (gv % (BV / 8)) * 8);
          bes[j] = xfi[K + r];
        } else {
          zero8(rvs[j]);
          bes[j] = 0.0f;
        }
      }
      const float xf0 = _tid < XF_ITEM ? xfi[_tid] : 0.0f;
      for (int j0 = 0; j0 < NX8 / NT; j0 += XB) {
        Raw8<TS> xr[XB];
        PRAGMA_UNROLL
        for (int jj = 0; jj < XB; ++jj) {
          if (j0 + jj < NX8 / NT) ld8(xr[jj], xi + (long)(_tid + (j0 + jj) * NT) * 8);
        }
        PRAGMA_UNROLL
        for (int jj = 0; jj < XB; ++jj) {
          if (j0 + jj >= NX8 / NT) break;
          const int g = _tid + (j0 + jj) * NT;
          float x[8];
          PRAGMA_UNROLL
          for (int i = 0; i < 8; ++i) x[i] = get8(xr[jj], i);
          kda_put8(kda_item_tile(smem, g, OFF_G, OFF_Q, OFF_K, OFF_A, OFF_P, LDK, LDA, G8), x, rot);
        }
      }
      if (_tid < XF_ITEM) smem[OFF_GAM + _tid] = xf0;
      for (int idx = _tid + NT; idx < XF_ITEM; idx += NT) smem[OFF_GAM + idx] = xfi[idx];
      PRAGMA_UNROLL
      for (int j = 0; j < NGV; ++j) {
        const int gv = _tid + j * NT;
        if (gv < NV8) {
          const int r = gv / (BV / 8), c = (gv % (BV / 8)) * 8;
          float xv[8];
          PRAGMA_UNROLL
          for (int i = 0; i < 8; ++i) xv[i] = get8(rvs[j], i) * bes[j];
          kda_put8(sV + r * LDV + c, xv, rot);
        }
      }
      BARRIER();
      PHASE(5);
      // Y = beta*V - (beta*Gamma*k) S (in place in sV), O1 = (Gamma*q) S -> sE
      gemm_job<PS, 2, false, false, 0, 0, true, false>(_warp, NW, 0, sG, LDK, sS, LDV,
          BT, BV, K, sV, LDV, -1.0f, sV, LDV, -1.0f);
      gemm_job<PS, 2, false, false, 0, 0, false, false>(_warp, NW, (BT / 16) * (BV / 16), sQ, LDK, sS, LDV,
          BT, BV, K, sE, LDA, 1.0f, sE, LDA, 1.0f);
      BARRIER();
      PHASE(8);
    }

    // P19: U = M Y; the state decays by Gamma_last
    gemm_job<PS, 2, false, false, 1, 0, false, false>(_warp, NW, 0, sA, LDA, sV, LDV,
        BT, BV, BT, sU, LDV, 1.0f, sU, LDV, 1.0f);
    for (int idx = _tid; idx < K * BV; idx += NT) {
      const int r = idx / BV, c = idx % BV;
      sS[r * LDV + c] *= sGam[r];
    }
    // k rows of block b to the last reference: exp(G_last - G) k = exp(R_4 - R_{b+1}) (k exp(R_{b+1} - G))
    if (!SPLIT) {
      const float Rl = sR[3 * K + ed];
      PRAGMA_UNROLL
      for (int blk = 0; blk < 3; ++blk) {
        const float lf = EXPF(Rl - sR[blk * K + ed]);
        PRAGMA_UNROLL
        for (int jj = 0; jj < 16 / RS; ++jj) sK[(blk * 16 + er + jj * RS) * LDK + ed] *= lf;
      }
    }
    BARRIER();
    PHASE(9);

    // P20: O = O1 + Aqk U (staged in sA); S += (exp(G_last-G) k)^T U
    gemm_job<PS, 2, false, false, 1, 0, true, false>(_warp, NW, 0, sP, LDA, sU, LDV,
        BT, BV, BT, SPLIT ? sE : sQ, SPLIT ? LDA : LDK, 1.0f, sA, LDA, 1.0f);
    gemm_job<PS, BV / 8, true, false, 0, 0, true, false>(_warp, NW, (BT / 16) * (BV / 16), sK, LDK, sU, LDV,
        K, BV, BT, sS, LDV, 1.0f, sS, LDV, 1.0f);
    BARRIER();
    PHASE(10);
    if (SPLIT) {
      // now, before an intra-chunk item takes sA (the next barrier is the step's)
      for (int idx = _tid; idx < Lc * BV; idx += NT) {
        const int r = idx / BV, c = idx % BV;
        o[((long)(bb * L + t0 + r) * Hn + h) * V + v0 + c] = static_cast<T>(sA[r * LDA + c]);
      }
    } else {
      prev_t0 = t0;
      prev_lc = Lc;
    }
    ++ch;
    ahead = false;
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
# Template: T, K, V, BVD, NTD, GATED (fused gated RMSNorm of o; needs BVD == V), KC (0, or the
# short conv's width: the kernel runs the convs too), LR (the kernel runs the low-rank second
# projections of f and of the gate too; needs GATED).
# Inputs: q_raw, k_raw, f [B,H,K]; v [B,H,V]; b_raw [B,H]; dt_bias [H*K]; A_log [H];
# state [B,H,K,V] fp32; norm_w [V]; gate [B,H,V] (raw logits; 1-element dummies when not GATED);
# eps [1] fp32; conv_state [B,KC-1,C], conv_w [C,KC] (T; dummies when KC is 0). With KC, q_raw is
# the token's projections before the convs, [B, C] = [q (H*K) | k (H*K) | v (H*V)], and k_raw, v
# are dummies. f_w [H*K, K], g_w [H*V, K] (T; dummies unless LR): with LR, f is f_a [B, K] and gate
# is g_a [B, K], the first projections, and f = f_a f_w^T, gate = g_a g_w^T (rounded to T as the
# unfused layer's matmuls are). Outputs: o [B,H,V] (T), state_out [B,H,K,V] fp32, conv_out
# [B,KC-1,C] (T; one element when KC is 0).
DECODE_BODY = r"""
/*@PROLOGUE@*/
  constexpr int RG = NTD / BVD;
  constexpr int RPT = K / RG;
  constexpr int NWD = NTD / 32;
  static_assert(NTD % BVD == 0 && K % RG == 0 && NWD >= 2 && BVD % 32 == 0, "decode shape");
  static_assert(!GATED || BVD == V, "gated norm needs the whole row");
  static_assert(!LR || GATED, "low-rank projections in the kernel need the gated norm");
  SHARED_ARR(float, sq, K);
  SHARED_ARR(float, slr, LR ? 3 * K + V : 1);  // LR: f_a, g_a, then head h's f (K) and gate (V)
  SHARED_ARR(float, sk, K);
  SHARED_ARR(float, se, K);
  SHARED_ARR(float, red, NTD);
  SHARED_ARR(float, misc, 4 + NWD);

  const int Hn = (int)A_log_shape[0];
  const int v0 = _gx * BVD;
  const int h = _gy;
  const int bb = _gz;
  const long bh = (long)bb * Hn + h;
  const int col = _tid % BVD;
  const int rg = _tid / BVD;
  const int C = 2 * Hn * K + Hn * V;  // KC: conv channels, [q | k | v]

  if (LR) {
    for (int j = _tid; j < K; j += NTD) {
      slr[j] = static_cast<float>(f[(long)bb * K + j]);
      slr[K + j] = static_cast<float>(gate[(long)bb * K + j]);
    }
    BARRIER();
    // head h's K + V dot products of length K: a warp an output at a time, its lanes over the
    // inputs (each warp load reads one contiguous piece of a weight row)
    for (int oi = _warp; oi < K + V; oi += NWD) {
      const bool isf = oi < K;
      const long wrow = isf ? ((long)h * K + oi) * K : ((long)h * V + oi - K) * K;
      float acc = 0.0f;
      PRAGMA_UNROLL
      for (int t = 0; t < K / 32; ++t) {
        const int j = _lane + 32 * t;
        acc += slr[(isf ? 0 : K) + j] * static_cast<float>(isf ? f_w[wrow + j] : g_w[wrow + j]);
      }
      acc = WARP_SUM(acc);
      if (_lane == 0) slr[2 * K + oi] = static_cast<float>(static_cast<T>(acc));  // (rounded as a matmul's output)
    }
    BARRIER();
  }
  for (int d = _tid; d < K; d += NTD) {
    if (KC > 0) {  // q and k channels of head h: the first v-slice writes their conv state
      sq[d] = kda_conv_silu<T, KC>(q_raw, conv_state, conv_w, conv_out, bb, C, h * K + d, _gx == 0);
      sk[d] = kda_conv_silu<T, KC>(q_raw, conv_state, conv_w, conv_out, bb, C, (Hn + h) * K + d, _gx == 0);
    } else {
      sq[d] = static_cast<float>(q_raw[bh * K + d]);
      sk[d] = static_cast<float>(k_raw[bh * K + d]);
    }
    const float fv = LR ? slr[2 * K + d] : static_cast<float>(f[bh * K + d]);
    se[d] = EXPF(-EXPF(A_log[h]) * kda_softplus(fv + dt_bias[h * K + d]));
  }
  // this thread's value column (every row group computes it; row group 0 writes its conv state)
  const float vin = KC > 0 ? kda_conv_silu<T, KC>(q_raw, conv_state, conv_w, conv_out, bb, C, 2 * Hn * K + h * V + v0 + col, rg == 0)
                           : static_cast<float>(v[bh * V + v0 + col]);
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
  const float u = beta * (vin - tot);
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
         kda_sigmoid(LR ? slr[3 * K + col] : static_cast<float>(gate[bh * V + col]));
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


PREFILL_INPUTS = ["q_raw", "k_raw", "v", "f", "b_raw", "dt_bias", "A_log", "init_state", "sync"]
DECODE_INPUTS = ["q_raw", "k_raw", "v", "f", "b_raw", "dt_bias", "A_log", "state",
                 "norm_w", "gate", "eps", "conv_state", "conv_w", "f_w", "g_w"]


def prefill_outputs(dialect: Dialect, prof: bool = False) -> list[str]:
    return (["o", "state_out", "xs", "xf"] + (["scratch"] if dialect.scratch_output else [])
            + (["prof"] if prof else []))


DECODE_OUTPUTS = ["o", "state_out", "conv_out"]


def prefill_smem_floats(K: int, BV: int) -> int:
    """Tile memory per threadgroup, in floats (mirrors OFF_END in PREFILL_BODY)."""
    BT = 64
    LDK, LDV, LDA = K + 8, BV + 8, BT + 8
    return 3 * BT * LDK + 2 * BT * LDV + K * LDV + 4 * BT * LDA + 4 * K + K + BT


def split_item_sizes(K: int) -> tuple[int, int]:
    """SPLIT: elements of one chunk item in xs (TS) and in xf (fp32) (mirrors XS_ITEM, XF_ITEM)."""
    BT = 64
    return 3 * BT * K + 2 * BT * BT, K + BT
