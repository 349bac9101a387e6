/* KDA chunk scan on the CPU: the chunked WY/UT form of kimi_mlx/ops/kda_chunked.py in C.
 *
 * Built on first use by kimi_mlx/ops/kda_cpu.py with the system C compiler (-O3 -march=native),
 * called through ctypes on contiguous fp32 buffers. Same maths as kda_chunked, per (batch, head)
 * and chunk of C = 64 tokens starting from state S [K, V]:
 *
 *   E_t    = exp(g_t)                  per-step decay (every factor <= 1, no exponent is ever > 0)
 *   Gam_i  = prod_{t <= i} E_t         decay from the chunk start through token i
 *   tail_j = prod_{j < t < C} E_t      decay from token j to the chunk end
 *   A_kk[i,j] = sum_c k_ic k_jc prod_{j < t <= i} E_tc   (j < i),  A_qk the same with q (j <= i)
 *   delta  = (I + diag(beta) A_kk)^-1 diag(beta) (v - (k*Gam) S)      (forward substitution)
 *   o      = scale ((q*Gam) S + A_qk delta)
 *   S     <- diag(Gam_C) S + (k*tail)^T delta
 *
 * A is built per 16-row block I (rows r = 16 I ... r + 15). Against earlier columns j < r the decay
 * is split at r:  prod_{j<t<=i} = [prod_{r<=t<=i} E_t] [prod_{j<t<r} E_t], both factors <= 1, so
 * that part is one matmul of the row-scaled (q, k) rows of the block by the column-scaled k rows.
 * Inside the diagonal 16-block the products are accumulated pair by pair (elementwise). All
 * factors are products of numbers in [0, 1]: they can only underflow where the true value is
 * negligible, and g = -inf (E = 0) is exact.
 *
 * Work is spread over (batch, head) pairs with pthreads; every matmul is a register-blocked 4x16
 * micro-kernel written with GCC vector extensions (AVX2/FMA under -march=native on x86, NEON on
 * ARM), so nothing depends on the BLAS that MLX got. Buffers along V are kept in 16-column panels
 * ([V/16][rows][16]) so that every matmul operand the micro-kernel streams is contiguous.
 *
 * Not compiled with -ffast-math: NaN and Inf propagate as in the MLX ops.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KDA_CPU_ABI 1
#define CH 64 /* chunk size */

typedef float v8 __attribute__((vector_size(32), aligned(32)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(32)));

#define VLD(p) (*(const v8 *)(p))
#define VST(p, x) (*(v8 *)(p) = (x))

int kda_cpu_abi(void) { return KDA_CPU_ABI; }

static inline v8 vsplat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static inline v8 vselect(v8i mask, v8 a, v8 b) /* mask ? a : b (mask lanes all-ones or zero) */
{
    return (v8)((mask & (v8i)a) | (~mask & (v8i)b));
}

static inline float hsum(v8 x)
{
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* exp(x) to ~1 ulp (Cephes expf polynomial), 8 lanes. x < -103.97 gives 0 (also -inf),
 * x > 88.72 gives +inf, NaN stays NaN. 2^n is applied in two halves so results in the
 * denormal range are right. */
static inline v8 vexp(v8 x)
{
    const v8 lo = vsplat(-103.972084f), hi = vsplat(88.7228394f);
    v8i under = x < lo, over = x > hi;
    v8 xc = vselect(under, lo, vselect(over, hi, x));
    const v8 magic = vsplat(12582912.0f); /* 1.5 * 2^23: round to nearest */
    v8 n = (xc * vsplat(1.44269504088896341f) + magic) - magic;
    v8 r = xc - n * vsplat(0.693359375f);
    r = r - n * vsplat(-2.12194440e-4f);
    v8 z = r * r;
    v8 y = vsplat(1.9875691500e-4f);
    y = y * r + vsplat(1.3981999507e-3f);
    y = y * r + vsplat(8.3334519073e-3f);
    y = y * r + vsplat(4.1665795894e-2f);
    y = y * r + vsplat(1.6666665459e-1f);
    y = y * r + vsplat(5.0000001201e-1f);
    y = y * z + r + vsplat(1.0f);
    v8i ni = __builtin_convertvector(n, v8i);
    v8i n1 = ni >> 1, n2 = ni - n1;
    v8 p1 = (v8)((n1 + 127) << 23), p2 = (v8)((n2 + 127) << 23);
    y = y * p1 * p2;
    const v8 inf = (v8)((v8i){0, 0, 0, 0, 0, 0, 0, 0} + 0x7f800000);
    return vselect(under, vsplat(0.0f), vselect(over, inf, y));
}

/* dst[0:n] = src[0:n], dst[n:np] = 0; dst aligned, src any float pointer (not read when n = 0) */
static inline void load_row(float *restrict dst, const float *restrict src, int n, int np)
{
    int c = 0;
    for (; c + 8 <= n; c += 8) {
        v8 x;
        memcpy(&x, src + c, sizeof x);
        VST(dst + c, x);
    }
    for (; c < n; c++)
        dst[c] = src[c];
    for (; c < np; c++)
        dst[c] = 0.0f;
}

/* ---------------------------------------------------------------------------------------------
 * Micro-kernel: a 4 x 16 tile of C (+)= A B over kd, A element (i, k) at A[i*ars + k*aks]
 * (row-major A: ars = lda, aks = 1; transposed: ars = 1, aks = lda), B row k at B + k*brs
 * (16 contiguous floats), C row i at C + i*crs (16 contiguous floats).
 * mode 0: C = AB, 1: C += AB, 2: C -= AB, 3: C = diag(rs) C + AB. */
static inline __attribute__((always_inline)) void tile4x16(int kd, const float *A, long ars, long aks,
                                                          const float *B, long brs, float *C, long crs,
                                                          int mode, const float *rs)
{
    v8 c00, c01, c10, c11, c20, c21, c30, c31;
    if (mode == 0) {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = vsplat(0.0f);
    } else {
        c00 = VLD(C), c01 = VLD(C + 8);
        c10 = VLD(C + crs), c11 = VLD(C + crs + 8);
        c20 = VLD(C + 2 * crs), c21 = VLD(C + 2 * crs + 8);
        c30 = VLD(C + 3 * crs), c31 = VLD(C + 3 * crs + 8);
        if (mode == 3) {
            v8 s0 = vsplat(rs[0]), s1 = vsplat(rs[1]), s2 = vsplat(rs[2]), s3 = vsplat(rs[3]);
            c00 *= s0, c01 *= s0, c10 *= s1, c11 *= s1, c20 *= s2, c21 *= s2, c30 *= s3, c31 *= s3;
        }
    }
    const float *a0 = A, *a1 = A + ars, *a2 = A + 2 * ars, *a3 = A + 3 * ars;
    for (int k = 0; k < kd; k++) {
        v8 b0 = VLD(B), b1 = VLD(B + 8);
        v8 x0 = vsplat(*a0), x1 = vsplat(*a1), x2 = vsplat(*a2), x3 = vsplat(*a3);
        if (mode == 2) {
            c00 -= x0 * b0, c01 -= x0 * b1, c10 -= x1 * b0, c11 -= x1 * b1;
            c20 -= x2 * b0, c21 -= x2 * b1, c30 -= x3 * b0, c31 -= x3 * b1;
        } else {
            c00 += x0 * b0, c01 += x0 * b1, c10 += x1 * b0, c11 += x1 * b1;
            c20 += x2 * b0, c21 += x2 * b1, c30 += x3 * b0, c31 += x3 * b1;
        }
        B += brs, a0 += aks, a1 += aks, a2 += aks, a3 += aks;
    }
    VST(C, c00), VST(C + 8, c01);
    VST(C + crs, c10), VST(C + crs + 8, c11);
    VST(C + 2 * crs, c20), VST(C + 2 * crs + 8, c21);
    VST(C + 3 * crs, c30), VST(C + 3 * crs + 8, c31);
}

/* C (+)= A B for M rows (multiple of 4) and npan 16-column panels: panel p of B starts at
 * B + p*bps, of C at C + p*cps. */
#define DEFINE_MM(name, mode)                                                                        \
    static void name(int M, int kd, int npan, const float *A, long ars, long aks, const float *B,  \
                     long bps, long brs, float *C, long cps, long crs, const float *rs)             \
    {                                                                                                \
        for (int p = 0; p < npan; p++)                                                               \
            for (int i = 0; i < M; i += 4)                                                           \
                tile4x16(kd, A + i * ars, ars, aks, B + p * bps, brs, C + p * cps + i * crs, crs,    \
                         mode, rs ? rs + i : 0);                                                     \
    }
DEFINE_MM(mm_set, 0)
DEFINE_MM(mm_add, 1)
DEFINE_MM(mm_sub, 2)
DEFINE_MM(mm_scale_add, 3)

/* ---------------------------------------------------------------------------------------------
 * Per-thread workspace. Kp = K rounded up to 8 (rows along K), Vq = V rounded up to 16, NP = Vq/16
 * panels; V-side buffers are panel-major [NP][rows][16]. */
typedef struct {
    int K, V, Kp, Vq, NP;
    float *S;       /* [NP][Kp][16] state of the head being worked on (points into Sg) */
    float *Sg;      /* [G][NP][Kp][16] states of a group of heads */
    float *Q, *Kk, *E; /* [CH][Kp] chunk rows: q, k, exp(g) */
    float *QG, *KG; /* [CH][Kp] q * Gam, k * Gam */
    float *KT;      /* [CH][Kp] k * tail */
    float *XL;      /* [32][Kp] q, k rows of one 16-block times the in-block decay */
    float *KR;      /* [3][Kp][16] column-scaled k of earlier 16-blocks, transposed */
    float *Aqk, *Akk; /* [CH][CH] */
    float *U;       /* [NP][CH][16] v, then v - (k*Gam) S */
    float *P;       /* [NP][CH][16] (q*Gam) S, then the output */
    float *D;       /* [NP][CH][16] delta */
    float *vec;     /* 4 x Kp scratch vectors */
    float beta[CH];
    void *mem;
} work_t;

static int work_init(work_t *w, int K, int V, int G)
{
    w->K = K, w->V = V;
    w->Kp = (K + 7) & ~7;
    w->Vq = (V + 15) & ~15;
    w->NP = w->Vq / 16;
    long Kp = w->Kp, Vq = w->Vq;
    long sizes[] = {G * Kp * Vq, CH * Kp, CH * Kp, CH * Kp, CH * Kp, CH * Kp, CH * Kp, 32 * Kp, 3 * Kp * 16,
                    CH * CH, CH * CH, CH * Vq, CH * Vq, CH * Vq, 4 * Kp};
    long total = 0;
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++)
        total += (sizes[i] + 15) & ~15L; /* 64-byte aligned pieces */
    float *m;
    if (posix_memalign((void **)&m, 64, total * sizeof(float)))
        return -1;
    memset(m, 0, total * sizeof(float));
    w->mem = m;
    float **dst[] = {&w->Sg, &w->Q, &w->Kk, &w->E, &w->QG, &w->KG, &w->KT, &w->XL, &w->KR,
                     &w->Aqk, &w->Akk, &w->U, &w->P, &w->D, &w->vec};
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *dst[i] = m;
        m += (sizes[i] + 15) & ~15L;
    }
    return 0;
}

typedef struct {
    const float *q, *k, *v, *g, *beta, *s0;
    float *o, *s_out;
    int B, T, H, K, V;
    float scale;
    int G;     /* heads per work item: a group runs chunk by chunk over its heads, so the rows it
                  reads are G*K floats long (fewer pages touched than one head's K floats) */
    int items; /* B * ceil(H / G) */
    int next;  /* atomic work counter over the items */
    int ran;  /* set by a worker that got its memory: it keeps going until no item is left */
} job_t;

/* One chunk of n <= CH tokens (rows n.. are padding: q = k = v = beta = 0, E = 1). */
static void chunk(work_t *w, const job_t *j, int b, int h, long t0, int n)
{
    const int K = w->K, V = w->V, Kp = w->Kp, NP = w->NP, H = j->H;
    const int nb = (n + 15) >> 4, R = nb * 16;
    float *restrict Q = w->Q, *restrict Kk = w->Kk, *restrict E = w->E;
    float *gam = w->vec, *tl = w->vec + Kp, *lv = w->vec + 2 * Kp, *rv = w->vec + 3 * Kp;

    /* pack the chunk's rows (zero padded); E = exp(g) */
    for (int i = 0; i < R; i++) {
        float *qi = Q + (long)i * Kp, *ki = Kk + (long)i * Kp, *ei = E + (long)i * Kp;
        const int m = i < n ? K : 0, mv = i < n ? V : 0; /* padding rows: all zero (E = exp(0) = 1) */
        const long row = ((long)b * j->T + t0 + i) * H + h;
        load_row(qi, j->q + row * K, m, Kp);
        load_row(ki, j->k + row * K, m, Kp);
        load_row(ei, j->g + row * K, m, Kp);
        w->beta[i] = i < n ? j->beta[row] : 0.0f;
        for (int p = 0; p < NP; p++) {
            int c0 = p * 16, mp = mv - c0 < 0 ? 0 : mv - c0 < 16 ? mv - c0 : 16;
            load_row(w->U + ((long)p * CH + i) * 16, j->v + row * V + c0, mp, 16);
        }
        for (int c = 0; c < Kp; c += 8)
            VST(ei + c, vexp(VLD(ei + c)));
    }

    /* Gam (running), q*Gam, k*Gam; then k*tail backwards */
    for (int c = 0; c < Kp; c += 8)
        VST(gam + c, vsplat(1.0f)), VST(tl + c, vsplat(1.0f));
    for (int i = 0; i < R; i++) {
        long o = (long)i * Kp;
        for (int c = 0; c < Kp; c += 8) {
            v8 gv = VLD(gam + c) * VLD(E + o + c);
            VST(gam + c, gv);
            VST(w->QG + o + c, VLD(Q + o + c) * gv);
            VST(w->KG + o + c, VLD(Kk + o + c) * gv);
        }
    }
    for (int i = R - 1; i >= 0; i--) {
        long o = (long)i * Kp;
        for (int c = 0; c < Kp; c += 8) {
            v8 tv = VLD(tl + c);
            VST(w->KT + o + c, VLD(Kk + o + c) * tv);
            VST(tl + c, tv * VLD(E + o + c));
        }
    }

    /* A_qk, A_kk */
    float *Aqk = w->Aqk, *Akk = w->Akk, *XL = w->XL, *KR = w->KR;
    for (int I = 0; I < nb; I++) {
        const int r = 16 * I;
        if (I > 0) {
            /* columns of the earlier blocks: scale the ones we have by the whole block I-1
             * (lv still holds its product), add block I-1's own columns */
            for (int J = 0; J < I - 1; J++) {
                float *kr = KR + (long)J * Kp * 16;
                for (int c = 0; c < Kp; c++) {
                    v8 s = vsplat(lv[c]);
                    VST(kr + c * 16, VLD(kr + c * 16) * s);
                    VST(kr + c * 16 + 8, VLD(kr + c * 16 + 8) * s);
                }
            }
            float *kr = KR + (long)(I - 1) * Kp * 16;
            for (int c = 0; c < Kp; c += 8)
                VST(rv + c, vsplat(1.0f));
            for (int jj = 15; jj >= 0; jj--) {
                const int jr = r - 16 + jj;
                const float *kj = Kk + (long)jr * Kp, *ej = E + (long)jr * Kp;
                for (int c = 0; c < Kp; c++)
                    kr[c * 16 + jj] = kj[c] * rv[c];
                for (int c = 0; c < Kp; c += 8)
                    VST(rv + c, VLD(rv + c) * VLD(ej + c));
            }
        }
        /* the block's q and k rows times prod_{r <= t <= i} E_t */
        for (int c = 0; c < Kp; c += 8)
            VST(lv + c, vsplat(1.0f));
        for (int ii = 0; ii < 16; ii++) {
            long o = (long)(r + ii) * Kp;
            for (int c = 0; c < Kp; c += 8) {
                v8 l = VLD(lv + c) * VLD(E + o + c);
                VST(lv + c, l);
                VST(XL + ii * Kp + c, VLD(Q + o + c) * l);
                VST(XL + (16 + ii) * Kp + c, VLD(Kk + o + c) * l);
            }
        }
        if (I > 0) {
            mm_set(16, Kp, I, XL, Kp, 1, KR, (long)Kp * 16, 16, Aqk + r * CH, 16, CH, 0);
            mm_set(16, Kp, I, XL + 16 * Kp, Kp, 1, KR, (long)Kp * 16, 16, Akk + r * CH, 16, CH, 0);
        }
        /* diagonal block, pair by pair: u = x_i * prod_{j < t <= i} E_t */
        for (int ii = 0; ii < 16; ii++) {
            const int i = r + ii;
            float *uq = w->XL, *uk = w->XL + Kp; /* XL is free again */
            const float *qi = Q + (long)i * Kp, *ki = Kk + (long)i * Kp;
            v8 a0 = vsplat(0.0f), a1 = vsplat(0.0f);
            for (int c = 0; c < Kp; c += 8) {
                VST(uq + c, VLD(qi + c));
                VST(uk + c, VLD(ki + c));
                a0 += VLD(qi + c) * VLD(ki + c);
            }
            (void)a1;
            Aqk[i * CH + i] = hsum(a0);
            Akk[i * CH + i] = 0.0f;
            for (int jj = ii + 1; jj < 16; jj++)
                Aqk[i * CH + r + jj] = 0.0f, Akk[i * CH + r + jj] = 0.0f;
            for (int jx = i - 1; jx >= r; jx--) {
                const float *e = E + (long)(jx + 1) * Kp, *kj = Kk + (long)jx * Kp;
                v8 q0 = vsplat(0.0f), q1 = vsplat(0.0f), k0 = vsplat(0.0f), k1 = vsplat(0.0f);
                int c = 0;
                for (; c + 16 <= Kp; c += 16) {
                    v8 e0 = VLD(e + c), e1 = VLD(e + c + 8);
                    v8 x0 = VLD(uq + c) * e0, x1 = VLD(uq + c + 8) * e1;
                    v8 y0 = VLD(uk + c) * e0, y1 = VLD(uk + c + 8) * e1;
                    VST(uq + c, x0), VST(uq + c + 8, x1), VST(uk + c, y0), VST(uk + c + 8, y1);
                    v8 kk0 = VLD(kj + c), kk1 = VLD(kj + c + 8);
                    q0 += x0 * kk0, q1 += x1 * kk1, k0 += y0 * kk0, k1 += y1 * kk1;
                }
                for (; c < Kp; c += 8) {
                    v8 e0 = VLD(e + c);
                    v8 x0 = VLD(uq + c) * e0, y0 = VLD(uk + c) * e0;
                    VST(uq + c, x0), VST(uk + c, y0);
                    q0 += x0 * VLD(kj + c), k0 += y0 * VLD(kj + c);
                }
                Aqk[i * CH + jx] = hsum(q0 + q1);
                Akk[i * CH + jx] = hsum(k0 + k1);
            }
        }
    }

    /* (q*Gam) S -> P;  v - (k*Gam) S -> U */
    const long sps = (long)Kp * 16, cps = (long)CH * 16;
    mm_set(R, Kp, NP, w->QG, Kp, 1, w->S, sps, 16, w->P, cps, 16, 0);
    mm_sub(R, Kp, NP, w->KG, Kp, 1, w->S, sps, 16, w->U, cps, 16, 0);

    /* delta: forward substitution, 16-block by 16-block */
    float *U = w->U, *D = w->D;
    for (int I = 0; I < nb; I++) {
        const int r = 16 * I;
        if (I > 0)
            mm_sub(16, r, NP, Akk + r * CH, CH, 1, D, cps, 16, U + r * 16, cps, 16, 0);
        for (int p = 0; p < NP; p++) {
            const float *u = U + p * cps;
            float *d = D + p * cps;
            for (int i = r; i < r + 16; i++) {
                v8 x0 = VLD(u + i * 16), x1 = VLD(u + i * 16 + 8);
                for (int jx = r; jx < i; jx++) {
                    v8 s = vsplat(Akk[i * CH + jx]);
                    x0 -= s * VLD(d + jx * 16), x1 -= s * VLD(d + jx * 16 + 8);
                }
                v8 bt = vsplat(w->beta[i]);
                VST(d + i * 16, x0 * bt), VST(d + i * 16 + 8, x1 * bt);
            }
        }
    }

    /* o = scale (P + A_qk delta), written out row by row */
    for (int I = 0; I < nb; I++) {
        const int r = 16 * I;
        mm_add(16, r + 16, NP, Aqk + r * CH, CH, 1, D, cps, 16, w->P + r * 16, cps, 16, 0);
    }
    const float scale = j->scale;
    for (int i = 0; i < n; i++) {
        float *orow = j->o + (((long)b * j->T + t0 + i) * H + h) * V;
        for (int p = 0; p < NP; p++) {
            const float *src = w->P + ((long)p * CH + i) * 16;
            int c0 = p * 16, m = V - c0 < 16 ? V - c0 : 16;
            for (int c = 0; c < m; c++)
                orow[c0 + c] = src[c] * scale;
        }
    }

    /* S <- diag(Gam_C) S + (k*tail)^T delta */
    mm_scale_add(Kp, R, NP, w->KT, 1, Kp, D, cps, 16, w->S, sps, 16, gam);
}

/* Heads h0 .. h0+nh-1 of batch b, all chunks. */
static void group(work_t *w, const job_t *j, int b, int h0, int nh)
{
    const int K = w->K, V = w->V, Kp = w->Kp, NP = w->NP;
    const long ss = (long)Kp * w->Vq;
    /* states in: [K][V] -> panels */
    memset(w->Sg, 0, nh * ss * sizeof(float));
    if (j->s0)
        for (int x = 0; x < nh; x++) {
            const float *s = j->s0 + ((long)b * j->H + h0 + x) * K * V;
            for (int c = 0; c < K; c++)
                for (int p = 0; p < NP; p++) {
                    int c0 = p * 16, m = V - c0 < 16 ? V - c0 : 16;
                    memcpy(w->Sg + x * ss + ((long)p * Kp + c) * 16, s + (long)c * V + c0, m * sizeof(float));
                }
        }
    for (long t0 = 0; t0 < j->T; t0 += CH)
        for (int x = 0; x < nh; x++) {
            w->S = w->Sg + x * ss;
            chunk(w, j, b, h0 + x, t0, j->T - t0 < CH ? (int)(j->T - t0) : CH);
        }
    for (int x = 0; x < nh; x++) {
        float *s = j->s_out + ((long)b * j->H + h0 + x) * K * V;
        for (int c = 0; c < K; c++)
            for (int p = 0; p < NP; p++) {
                int c0 = p * 16, m = V - c0 < 16 ? V - c0 : 16;
                memcpy(s + (long)c * V + c0, w->Sg + x * ss + ((long)p * Kp + c) * 16, m * sizeof(float));
            }
    }
}

static void *worker(void *arg)
{
    job_t *j = arg;
    work_t w;
    if (work_init(&w, j->K, j->V, j->G))
        return 0;
    __atomic_store_n(&j->ran, 1, __ATOMIC_RELAXED);
    const int per_b = (j->H + j->G - 1) / j->G;
    for (;;) {
        int it = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (it >= j->items)
            break;
        int b = it / per_b, h0 = (it % per_b) * j->G;
        group(&w, j, b, h0, j->H - h0 < j->G ? j->H - h0 : j->G);
    }
    free(w.mem);
    return 0;
}

static int run(job_t *j, int nthreads)
{
    if (nthreads > j->items)
        nthreads = j->items;
    if (nthreads > 64)
        nthreads = 64;
    pthread_t tid[64];
    int started = 0;
    for (int i = 1; i < nthreads; i++) {
        if (pthread_create(&tid[started], 0, worker, j))
            break; /* fewer threads: the others pick up the work */
        started++;
    }
    worker(j);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], 0);
    /* a worker that could not allocate did nothing; any one that could did all that was left */
    return j->items > 0 && !j->ran ? -1 : 0;
}

/* Prefill. o [B,T,H,V] and s_out [B,H,K,V] are written; s0 may be NULL (zero state). group: heads
 * per work item (0: automatic). Returns 0, or -1 when memory could not be allocated (outputs then
 * incomplete). */
int kda_cpu_scan(const float *q, const float *k, const float *v, const float *g, const float *beta,
                 const float *s0, float *o, float *s_out, int B, int T, int H, int K, int V, float scale,
                 int nthreads, int group)
{
    if (group <= 0) { /* at least two items per thread (load balance), at most 8 heads */
        int t = nthreads > 0 ? nthreads : 1;
        group = B * H / (2 * t);
        group = group < 1 ? 1 : group > 8 ? 8 : group;
    }
    if (group > H)
        group = H;
    job_t j = {q, k, v, g, beta, s0, o, s_out, B, T, H, K, V, scale, group, B * ((H + group - 1) / group), 0, 0};
    return run(&j, nthreads);
}
