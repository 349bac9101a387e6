"""Thin dialect layer: what differs between Metal and CUDA, and nothing else.

The KDA kernels (kda_template.py) are written once against the names defined here:

  DFN                 helper-function qualifier
  DEVP / CDEVP        pointer qualifier for device memory (tiles, inputs)
  TH                  reference qualifier for per-thread objects
  BARRIER()           threadgroup / block barrier (orders tile memory too)
  WARP_SYNC()         simdgroup / warp barrier
  GROUP_BARRIER(id, n) barrier of the n threads of warp group id (CUDA bar.sync; NAMED_BARRIERS is 1
                      there). Metal has none: it is the threadgroup barrier, for one group only
  WARP_ALL(p)         true on every lane when p holds on all 32
  EXPF EXP2F LOGF LOG1PF RSQRTF   fp32 maths
  SHFL_XOR(x, m)      lane exchange inside a simdgroup / warp of 32
  WARP_SUM(x)         sum over the 32 lanes
  PRAGMA_UNROLL       full unroll of a constant-trip loop (PRAGMA_UNROLL2: by two)
  PREFETCH_L2(p)      hint: fetch the line at p into L2 ahead of use (CUDA; nothing on Metal)
  KEEP_BRANCH()       first statement of a rarely taken block: keeps the compiler from predicating
                      the block into every pass (CUDA: an empty volatile asm; nothing on Metal)
  SHARED_ARR(T, n, N) a small per-threadgroup array
  SYNC_PTR(p), sync_add/sync_load/sync_load_acquire/sync_store_release, SPIN_PAUSE()
                      device-scope counters and flags between threadgroups (prefill SPLIT)
  ld8/st8/zero8/get8  8 consecutive elements of a global array in one go
  ASYNC_COPY16(dst, src, valid), ASYNC_COMMIT(), ASYNC_WAIT1(), ASYNC_WAIT0()
                      16 bytes global -> tile memory without registers (CUDA cp.async, zeros when
                      !valid; waits leave at most 1 / 0 committed groups in flight). ASYNC_COPIES
                      is 1 where they exist; Metal has none (the kernels copy synchronously there)
  FragA<P>, FragB<P>, FragC and frag_{zero,load_a,load_b,load_b2,load_c,store_c,scale,mma}
                      16x8 output tiles on the matrix units: simdgroup_matrix 8x8 pairs on
                      Metal, mma.sync m16n8k16 (bf16) or m16n8k8 (tf32, 3xtf32) on CUDA
  KSTEP(P)            contraction step of one frag_mma for precision P

and two body snippets: the prologue (thread ids into _tid/_warp/_lane/_gx/_gy/_gz, which must
appear in the kernel *body* because MLX only adds Metal builtin arguments it finds there) and
the tile-memory declaration (CUDA: dynamic shared memory; Metal: a device scratch output,
because a Metal threadgroup has only 32 KB and one chunk's tiles need ~200 KB).
"""
from __future__ import annotations

from dataclasses import dataclass

# Precision of one matrix product (the CUDA twin; Metal always multiplies fp32 fragments).
PREC_BF16 = 0      # bf16 operands, fp32 accumulate (m16n8k16)
PREC_TF32X3 = 1    # fp32 split into tf32 hi + lo, three m16n8k8 products: ~fp32 accuracy
PREC_TF32 = 2      # one tf32 product (10-bit mantissa)

_COMMON_PREC = f"""
#define PREC_BF16 {PREC_BF16}
#define PREC_TF32X3 {PREC_TF32X3}
#define PREC_TF32 {PREC_TF32}
"""

METAL_HEADER = _COMMON_PREC + r"""
#ifndef KDA_METAL_STUB
#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#endif
using namespace metal;

#define DFN inline
#define DEVP device
#define CDEVP const device
#define TH thread
#define BARRIER() threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)
#define WARP_SYNC() simdgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)
#define NAMED_BARRIERS 0
#define GROUP_BARRIER(id, n) BARRIER()
#define WARP_ALL(p) simd_all(p)
#define EXPF(x) metal::exp(x)
#define EXP2F(x) metal::exp2(x)
#define LOGF(x) metal::log(x)
#define LOG1PF(x) metal::log(1.0f + (x))
#define RSQRTF(x) metal::rsqrt(x)
#define SHFL_XOR(x, m) simd_shuffle_xor((x), (ushort)(m))
#define WARP_SUM(x) simd_sum(x)
#define PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define PRAGMA_UNROLL2 _Pragma("clang loop unroll_count(2)")
#define SHARED_ARR(T, name, N) threadgroup T name[N]
#define KSTEP(P) 8

// Fragments: a 16x8 fp32 tile is two 8x8 simdgroup matrices (rows 0-7 and 8-15).
template <int P> struct FragA { simdgroup_float8x8 m[2]; };
template <int P> struct FragB { simdgroup_float8x8 m; };
struct FragC { simdgroup_float8x8 m[2]; };

DFN void frag_zero(thread FragC& c) {
  c.m[0] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  c.m[1] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
}
// A(m, k) = TA ? p[k*ld + m] : p[m*ld + k]; the tile starts at (m0, k0)
template <bool TA, int P, typename PT>
DFN void frag_load_a(thread FragA<P>& a, PT p, int ld, int m0, int k0) {
  if (TA) {
    simdgroup_load(a.m[0], p + (long)k0 * ld + m0, (ulong)ld, ulong2(0, 0), true);
    simdgroup_load(a.m[1], p + (long)k0 * ld + m0 + 8, (ulong)ld, ulong2(0, 0), true);
  } else {
    simdgroup_load(a.m[0], p + (long)m0 * ld + k0, (ulong)ld);
    simdgroup_load(a.m[1], p + (long)(m0 + 8) * ld + k0, (ulong)ld);
  }
}
// B(k, n) = TB ? p[n*ld + k] : p[k*ld + n]; the tile starts at (k0, n0)
template <bool TB, int P, typename PT>
DFN void frag_load_b(thread FragB<P>& b, PT p, int ld, int k0, int n0) {
  if (TB) {
    simdgroup_load(b.m, p + (long)n0 * ld + k0, (ulong)ld, ulong2(0, 0), true);
  } else {
    simdgroup_load(b.m, p + (long)k0 * ld + n0, (ulong)ld);
  }
}
// the B fragments of columns n0.. and n0 + 8..
template <bool TB, int P, typename PT>
DFN void frag_load_b2(thread FragB<P>& b0, thread FragB<P>& b1, PT p, int ld, int k0, int n0) {
  frag_load_b<TB>(b0, p, ld, k0, n0);
  frag_load_b<TB>(b1, p, ld, k0, n0 + 8);
}
template <typename PT>
DFN void frag_load_c(thread FragC& c, PT p, int ld, int m0, int n0) {
  simdgroup_load(c.m[0], p + (long)m0 * ld + n0, (ulong)ld);
  simdgroup_load(c.m[1], p + (long)(m0 + 8) * ld + n0, (ulong)ld);
}
template <typename PT>
DFN void frag_store_c(thread FragC& c, PT p, int ld, int m0, int n0) {
  simdgroup_store(c.m[0], p + (long)m0 * ld + n0, (ulong)ld);
  simdgroup_store(c.m[1], p + (long)(m0 + 8) * ld + n0, (ulong)ld);
}
DFN void frag_scale(thread FragC& c, float s) {
  c.m[0].thread_elements() *= s;
  c.m[1].thread_elements() *= s;
}
template <int P>
DFN void frag_mma(thread FragC& c, thread FragA<P>& a, thread FragB<P>& b) {
  simdgroup_multiply_accumulate(c.m[0], a.m[0], b.m, c.m[0]);
  simdgroup_multiply_accumulate(c.m[1], a.m[1], b.m, c.m[1]);
}

// Where a lane's elements sit in a 16x8 FragC (Apple's 8x8 layout, as in MLX's steel MMA):
// rows frag_row and frag_row + 8, columns frag_col and frag_col + 1. Lanes of one row differ
// in bits ROW_XOR_A and ROW_XOR_B.
DFN int frag_row(int lane) { return ((lane >> 2) & 4) + ((lane >> 1) & 3); }
DFN int frag_col(int lane) { return ((lane >> 2) & 2) * 2 + (lane & 1) * 2; }
#define ROW_XOR_A 1
#define ROW_XOR_B 8
// element i of the lane: 0 (r, c), 1 (r, c+1), 2 (r+8, c), 3 (r+8, c+1)
DFN float frag_get(thread FragC& c, int i) { return c.m[i >> 1].thread_elements()[i & 1]; }
DFN void frag_set(thread FragC& c, int i, float v) { c.m[i >> 1].thread_elements()[i & 1] = v; }
DFN void frag_scale2(thread FragC& c, float s_lo, float s_hi) {
  c.m[0].thread_elements() *= s_lo;
  c.m[1].thread_elements() *= s_hi;
}
#ifdef KDA_METAL_STUB
#define FRAG_OWNED(m) ::kda_emu::gather_owned(m)
#else
#define FRAG_OWNED(m) do { } while (0)
#endif
// The A operand of one KSTEP contraction from KSTEP/8 accumulators (P of attention: keys are
// the contraction). Same layout on Metal: a copy.
template <int P>
DFN void frag_a_from_c(thread FragA<P>& a, thread FragC* c) {
  a.m[0] = c[0].m[0];
  a.m[1] = c[0].m[1];
  FRAG_OWNED(a.m[0]);
  FRAG_OWNED(a.m[1]);
}
#define TILE_PTR(TY, base, off) ((device TY*)((base) + (off)))

// 8 consecutive elements of an input, loaded together, read as floats
template <typename T> struct Raw8 { T v[8]; };
template <typename T, typename PT>
DFN void ld8(thread Raw8<T>& r, PT p) {
  for (int i = 0; i < 8; ++i) r.v[i] = p[i];
}
template <typename T>
DFN void zero8(thread Raw8<T>& r) {
  for (int i = 0; i < 8; ++i) r.v[i] = T(0.0f);
}
template <typename T>
DFN float get8(thread const Raw8<T>& r, int i) { return static_cast<float>(r.v[i]); }
template <typename T, typename PT>
DFN void st8(PT p, thread const float* x) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<T>(x[i]);
}
#define KDA_CLOCK() 0L
#define PREFETCH_L2(p) do { } while (0)
#define KEEP_BRANCH() do { } while (0)
#define ASYNC_COPIES 0
#define ASYNC_COPY16(dst, src, valid) do { } while (0)
#define ASYNC_COMMIT() do { } while (0)
#define ASYNC_WAIT1() do { } while (0)
#define ASYNC_WAIT0() do { } while (0)
#define BULK_COPIES 0
#define MBAR_INIT(bar, count) do { } while (0)
#define MBAR_EXPECT(bar, bytes) do { } while (0)
#define BULK_COPY(dst, src, bytes, bar) do { } while (0)
#define MBAR_WAIT(bar, parity) do { } while (0)

// Counters and flags shared by threadgroups (device atomics; fences at device scope, MSL 3.2)
#define SYNC_PTR(p) ((device atomic_int*)(p))
DFN int sync_add(device atomic_int* p, int v) { return atomic_fetch_add_explicit(p, v, memory_order_relaxed); }
DFN int sync_load(device atomic_int* p) { return atomic_load_explicit(p, memory_order_relaxed); }
#define KDA_DEVICE_FENCE() atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device)
DFN int sync_load_acquire(device atomic_int* p) {
  const int v = atomic_load_explicit(p, memory_order_relaxed);
  KDA_DEVICE_FENCE();
  return v;
}
DFN void sync_store_release(device atomic_int* p, int v) {
  KDA_DEVICE_FENCE();
  atomic_store_explicit(p, v, memory_order_relaxed);
}
#define SPIN_PAUSE() do { } while (0)
"""

CUDA_HEADER = _COMMON_PREC + r"""
#ifdef KDA_CUDA_STUB
#else
#include <cuda_bf16.h>
#endif

#define DFN __device__ __forceinline__
#define DEVP
#define CDEVP const
#define TH
#define BARRIER() __syncthreads()
#define WARP_SYNC() __syncwarp()
#define NAMED_BARRIERS 1
#ifdef KDA_CUDA_STUB
DFN void kda_bar_sync(int id, int n) { kda_cuda::bar_sync(id, n); }
#else
DFN void kda_bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(n) : "memory"); }
#endif
#define GROUP_BARRIER(id, n) kda_bar_sync((id), (n))
#define WARP_ALL(p) __all_sync(0xffffffffu, (p))
#define EXPF(x) __expf(x)
#ifdef KDA_CUDA_STUB
DFN float kda_ex2(float x) { return kda_cuda::ex2_approx_ftz(x); }
#else
DFN float kda_ex2(float x) {  // 2^x in one MUFU op (what __expf uses after its multiply)
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
#endif
#define EXP2F(x) kda_ex2(x)
#define LOGF(x) __logf(x)
#define LOG1PF(x) log1pf(x)
#define RSQRTF(x) rsqrtf(x)
#define SHFL_XOR(x, m) __shfl_xor_sync(0xffffffffu, (x), (m))
#define PRAGMA_UNROLL _Pragma("unroll")
#define PRAGMA_UNROLL2 _Pragma("unroll 2")
#define SHARED_ARR(T, name, N) __shared__ T name[N]
#define KSTEP(P) ((P) == PREC_BF16 ? 16 : 8)

DFN float kda_warp_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 16);
  x += __shfl_xor_sync(0xffffffffu, x, 8);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}
#define WARP_SUM(x) kda_warp_sum(x)

// Fragments of mma.sync (PTX ISA "matrix fragments"): g = lane/4, t = lane%4.
// bf16 m16n8k16: A regs {(g,2t..) (g+8,2t..) (g,2t+8..) (g+8,2t+8..)}, B {(2t..,g) (2t+8..,g)}
// tf32 m16n8k8:  A {(g,t) (g+8,t) (g,t+4) (g+8,t+4)}, B {(t,g) (t+4,g)}; 3xtf32 keeps hi and lo.
// C (both): {(g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1)}
template <int P> struct FragA { unsigned int x[8]; };
template <int P> struct FragB { unsigned int x[4]; };
struct FragC { float x[4]; };

DFN unsigned int kda_pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned int*>(&v);
}
#ifdef KDA_CUDA_STUB
DFN unsigned int kda_tf32(float x) { return kda_cuda::cvt_rna_tf32(x); }
#else
DFN unsigned int kda_tf32(float x) {
  unsigned int r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
#endif
// element (r, c) of a row-major (T=false) or column-major (T=true) fp32 tile
template <bool TR>
DFN float kda_ld(const float* p, int ld, int r, int c) {
  return TR ? p[c * ld + r] : p[r * ld + c];
}
// elements (r, c) and (r, c+1); c even
template <bool TR>
DFN float2 kda_ld2(const float* p, int ld, int r, int c) {
  if (TR) return make_float2(p[c * ld + r], p[(c + 1) * ld + r]);
  return *reinterpret_cast<const float2*>(p + r * ld + c);
}
// elements (r, c) and (r+1, c); r even
template <bool TR>
DFN float2 kda_ld2r(const float* p, int ld, int r, int c) {
  if (TR) return *reinterpret_cast<const float2*>(p + c * ld + r);
  return make_float2(p[r * ld + c], p[(r + 1) * ld + c]);
}
DFN void kda_split(float v, unsigned int& hi, unsigned int& lo) {
  hi = kda_tf32(v);
  lo = kda_tf32(v - __uint_as_float(hi));
}

DFN void frag_zero(FragC& c) { c.x[0] = c.x[1] = c.x[2] = c.x[3] = 0.0f; }

template <bool TA, int P>
DFN void frag_load_a(FragA<P>& a, const float* p, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (P == PREC_BF16) {
    float2 v0 = kda_ld2<TA>(p, ld, m0 + g, k0 + 2 * t);
    float2 v1 = kda_ld2<TA>(p, ld, m0 + g + 8, k0 + 2 * t);
    float2 v2 = kda_ld2<TA>(p, ld, m0 + g, k0 + 2 * t + 8);
    float2 v3 = kda_ld2<TA>(p, ld, m0 + g + 8, k0 + 2 * t + 8);
    a.x[0] = kda_pack_bf16(v0.x, v0.y);
    a.x[1] = kda_pack_bf16(v1.x, v1.y);
    a.x[2] = kda_pack_bf16(v2.x, v2.y);
    a.x[3] = kda_pack_bf16(v3.x, v3.y);
  } else {
    float v[4];
    v[0] = kda_ld<TA>(p, ld, m0 + g, k0 + t);
    v[1] = kda_ld<TA>(p, ld, m0 + g + 8, k0 + t);
    v[2] = kda_ld<TA>(p, ld, m0 + g, k0 + t + 4);
    v[3] = kda_ld<TA>(p, ld, m0 + g + 8, k0 + t + 4);
    if (P == PREC_TF32X3) {
#pragma unroll
      for (int i = 0; i < 4; ++i) kda_split(v[i], a.x[i], a.x[4 + i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) a.x[i] = kda_tf32(v[i]);
    }
  }
}
// B(k, n) = TB ? p[n*ld + k] : p[k*ld + n]
template <bool TB, int P>
DFN void frag_load_b(FragB<P>& b, const float* p, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (P == PREC_BF16) {
    // B(k, n) with k = row: as a "row-major" tile it is p[k*ld+n] (TB=false), transposed p[n*ld+k]
    float2 v0 = kda_ld2r<TB>(p, ld, k0 + 2 * t, n0 + g);
    float2 v1 = kda_ld2r<TB>(p, ld, k0 + 2 * t + 8, n0 + g);
    b.x[0] = kda_pack_bf16(v0.x, v0.y);
    b.x[1] = kda_pack_bf16(v1.x, v1.y);
  } else {
    float v0 = kda_ld<TB>(p, ld, k0 + t, n0 + g);
    float v1 = kda_ld<TB>(p, ld, k0 + t + 4, n0 + g);
    if (P == PREC_TF32X3) {
      kda_split(v0, b.x[0], b.x[2]);
      kda_split(v1, b.x[1], b.x[3]);
    } else {
      b.x[0] = kda_tf32(v0);
      b.x[1] = kda_tf32(v1);
    }
  }
}
DFN void frag_load_c(FragC& c, const float* p, int ld, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float2 v0 = *reinterpret_cast<const float2*>(p + (m0 + g) * ld + n0 + 2 * t);
  float2 v1 = *reinterpret_cast<const float2*>(p + (m0 + g + 8) * ld + n0 + 2 * t);
  c.x[0] = v0.x; c.x[1] = v0.y; c.x[2] = v1.x; c.x[3] = v1.y;
}
DFN void frag_store_c(FragC& c, float* p, int ld, int m0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  *reinterpret_cast<float2*>(p + (m0 + g) * ld + n0 + 2 * t) = make_float2(c.x[0], c.x[1]);
  *reinterpret_cast<float2*>(p + (m0 + g + 8) * ld + n0 + 2 * t) = make_float2(c.x[2], c.x[3]);
}
DFN void frag_scale(FragC& c, float s) {
  c.x[0] *= s; c.x[1] *= s; c.x[2] *= s; c.x[3] *= s;
}
#ifdef KDA_CUDA_STUB
DFN void kda_mma_bf16(FragC& c, const unsigned int* a, const unsigned int* b) { kda_cuda::mma_bf16_m16n8k16(c.x, a, b); }
DFN void kda_mma_tf32(FragC& c, const unsigned int* a, const unsigned int* b) { kda_cuda::mma_tf32_m16n8k8(c.x, a, b); }
#else
DFN void kda_mma_bf16(FragC& c, const unsigned int* a, const unsigned int* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c.x[0]), "+f"(c.x[1]), "+f"(c.x[2]), "+f"(c.x[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
DFN void kda_mma_tf32(FragC& c, const unsigned int* a, const unsigned int* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c.x[0]), "+f"(c.x[1]), "+f"(c.x[2]), "+f"(c.x[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
// 8 consecutive elements of an input in one or two 16-byte loads, read as floats
template <typename T> struct Raw8 { uint4 w[sizeof(T) / 2]; };
template <typename T>
DFN void ld8(Raw8<T>& r, const T* p) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.w[i] = q[i];
}
template <typename T>
DFN void zero8(Raw8<T>& r) {
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) r.w[i] = make_uint4(0u, 0u, 0u, 0u);
}
template <typename T>
DFN float get8(const Raw8<T>& r, int i) { return static_cast<float>(reinterpret_cast<const T*>(r.w)[i]); }
template <typename T>
DFN void st8(T* p, const float* x) {
  Raw8<T> r;
#pragma unroll
  for (int i = 0; i < 8; ++i) reinterpret_cast<T*>(r.w)[i] = static_cast<T>(x[i]);
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int i = 0; i < (int)(sizeof(T) / 2); ++i) q[i] = r.w[i];
}
#define KDA_CLOCK() ((long)clock64())

// Counters and flags shared by blocks (global memory, gpu scope)
#define SYNC_PTR(p) ((int*)(p))
DFN int sync_add(int* p, int v) { return atomicAdd(p, v); }
DFN int sync_load(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
#ifdef KDA_CUDA_STUB
DFN int sync_load_acquire(const int* p) { return kda_cuda::ld_acquire(p); }
DFN void sync_store_release(int* p, int v) { kda_cuda::st_release(p, v); }
#else
DFN int sync_load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
DFN void sync_store_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
#endif
#define SPIN_PAUSE() __nanosleep(128)
// a hint: bring the 128-byte line at p into L2 (no registers, nothing waits for it)
#ifdef KDA_CUDA_STUB
DFN void kda_prefetch_l2(const void*) {}
#else
DFN void kda_prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
#endif
#define PREFETCH_L2(p) kda_prefetch_l2((const void*)(p))
// an empty volatile asm cannot be speculated, so the block that holds it stays a branch
#define KEEP_BRANCH() asm volatile("")
// cp.async (sm_80+): 16 bytes global -> shared, bypassing L1 and registers; src-size 0 writes zeros
#ifdef KDA_CUDA_STUB
DFN void kda_cp_async16(void* dst, const void* src, bool valid) { kda_cuda::cp_async16(dst, src, valid); }
#else
DFN void kda_cp_async16(void* dst, const void* src, bool valid) {
  const unsigned int s = (unsigned int)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
#endif
#define ASYNC_COPIES 1
#define ASYNC_COPY16(dst, src, valid) kda_cp_async16((void*)(dst), (const void*)(src), (valid))
#ifdef KDA_CUDA_STUB
#define ASYNC_COMMIT() kda_cuda::cp_async_commit()
#define ASYNC_WAIT1() kda_cuda::cp_async_wait(1)
#define ASYNC_WAIT0() kda_cuda::cp_async_wait(0)
#else
#define ASYNC_COMMIT() asm volatile("cp.async.commit_group;\n" ::: "memory")
#define ASYNC_WAIT1() asm volatile("cp.async.wait_group 1;\n" ::: "memory")
#define ASYNC_WAIT0() asm volatile("cp.async.wait_group 0;\n" ::: "memory")
#endif
// Bulk copies (sm_90): cp.async.bulk moves `bytes` (a multiple of 16) global -> shared and counts
// them on an mbarrier in shared memory. A phase of the barrier completes when `count` threads
// have arrived (MBAR_EXPECT arrives and adds the bytes to expect) and those bytes have landed;
// MBAR_WAIT(bar, parity) waits for the phase of that parity (0 for the first use, then 1, 0, ...).
#define BULK_COPIES 1
#ifdef KDA_CUDA_STUB
#define MBAR_INIT(bar, count) kda_cuda::mbar_init((void*)(bar), (count))
#define MBAR_EXPECT(bar, bytes) kda_cuda::mbar_expect((void*)(bar), (bytes))
#define BULK_COPY(dst, src, bytes, bar) kda_cuda::bulk_copy((void*)(dst), (const void*)(src), (bytes), (void*)(bar))
#define MBAR_WAIT(bar, parity) kda_cuda::mbar_wait((void*)(bar), (parity))
#else
DFN unsigned int kda_sa(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }
DFN void kda_mbar_init(void* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(kda_sa(bar)), "r"(count) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
DFN void kda_mbar_expect(void* bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(kda_sa(bar)), "r"(bytes) : "memory");
}
DFN void kda_bulk_copy(void* dst, const void* src, int bytes, void* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               :: "r"(kda_sa(dst)), "l"(src), "r"(bytes), "r"(kda_sa(bar)) : "memory");
}
DFN void kda_mbar_wait(void* bar, int parity) {
  unsigned int ok = 0;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(ok) : "r"(kda_sa(bar)), "r"(parity) : "memory");
  } while (!ok);
}
#define MBAR_INIT(bar, count) kda_mbar_init((void*)(bar), (count))
#define MBAR_EXPECT(bar, bytes) kda_mbar_expect((void*)(bar), (bytes))
#define BULK_COPY(dst, src, bytes, bar) kda_bulk_copy((void*)(dst), (const void*)(src), (bytes), (void*)(bar))
#define MBAR_WAIT(bar, parity) kda_mbar_wait((void*)(bar), (parity))
#endif

template <int P>
DFN void frag_mma(FragC& c, FragA<P>& a, FragB<P>& b) {
  if (P == PREC_BF16) {
    kda_mma_bf16(c, a.x, b.x);
  } else if (P == PREC_TF32X3) {
    // small terms first; the lo*lo term is below fp32 rounding
    kda_mma_tf32(c, a.x + 4, b.x);
    kda_mma_tf32(c, a.x, b.x + 2);
    kda_mma_tf32(c, a.x, b.x);
  } else {
    kda_mma_tf32(c, a.x, b.x);
  }
}
// Where a lane's elements sit in a 16x8 FragC (mma.sync C layout): rows frag_row and
// frag_row + 8, columns frag_col and frag_col + 1. Lanes of one row differ in bits ROW_XOR_A/B.
DFN int frag_row(int lane) { return lane >> 2; }
DFN int frag_col(int lane) { return 2 * (lane & 3); }
#define ROW_XOR_A 1
#define ROW_XOR_B 2
DFN float frag_get(const FragC& c, int i) { return c.x[i]; }
DFN void frag_set(FragC& c, int i, float v) { c.x[i] = v; }
DFN void frag_scale2(FragC& c, float s_lo, float s_hi) {
  c.x[0] *= s_lo; c.x[1] *= s_lo; c.x[2] *= s_hi; c.x[3] *= s_hi;
}
// The A operand of one KSTEP contraction from KSTEP/8 accumulators (P of attention: keys are
// the contraction). bf16: the C layout of two n8 tiles is the A layout of m16n8k16; tf32:
// lanes exchange their pairs.
template <int P>
DFN void frag_a_from_c(FragA<P>& a, const FragC* c) {
  if (P == PREC_BF16) {
    a.x[0] = kda_pack_bf16(c[0].x[0], c[0].x[1]);
    a.x[1] = kda_pack_bf16(c[0].x[2], c[0].x[3]);
    a.x[2] = kda_pack_bf16(c[1].x[0], c[1].x[1]);
    a.x[3] = kda_pack_bf16(c[1].x[2], c[1].x[3]);
  } else {
    const int lane = threadIdx.x & 31, t = lane & 3;
    const int s0 = (lane & ~3) | (t >> 1), s1 = (lane & ~3) | (2 + (t >> 1));
    float v[4];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float e0 = __shfl_sync(0xffffffffu, c[0].x[2 * r], s0);
      const float o0 = __shfl_sync(0xffffffffu, c[0].x[2 * r + 1], s0);
      const float e1 = __shfl_sync(0xffffffffu, c[0].x[2 * r], s1);
      const float o1 = __shfl_sync(0xffffffffu, c[0].x[2 * r + 1], s1);
      v[r] = (t & 1) ? o0 : e0;       // (g + 8r, t)
      v[2 + r] = (t & 1) ? o1 : e1;   // (g + 8r, t + 4)
    }
    if (P == PREC_TF32X3) {
#pragma unroll
      for (int i = 0; i < 4; ++i) kda_split(v[i], a.x[i], a.x[4 + i]);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) a.x[i] = kda_tf32(v[i]);
    }
  }
}
// bf16 tiles in shared memory (MLA kernels): pairs along the contiguous axis are one 32-bit load
DFN unsigned int kda_ld_pair(const __nv_bfloat16* p) { return *reinterpret_cast<const unsigned int*>(p); }
DFN unsigned int kda_pair2(const __nv_bfloat16* p, int stride) {
  __nv_bfloat162 v;
  v.x = p[0];
  v.y = p[stride];
  return *reinterpret_cast<unsigned int*>(&v);
}
// ldmatrix (sm_75+): each lane names one 16-byte row of an 8x8 bf16 matrix (lanes 8j..8j+7:
// matrix j); register j of a lane gets its fragment pair of matrix j (.trans: of the transpose).
// Rows must be 16-byte aligned: tile strides and column offsets are multiples of 8 elements.
DFN unsigned int kda_smem(const void* p) { return (unsigned int)__cvta_generic_to_shared(p); }
#ifdef KDA_CUDA_STUB
DFN void kda_ldsm4(unsigned int* r, const __nv_bfloat16* p) { kda_cuda::ldmatrix<4, false>(r, p); }
DFN void kda_ldsm4t(unsigned int* r, const __nv_bfloat16* p) { kda_cuda::ldmatrix<4, true>(r, p); }
DFN void kda_ldsm2(unsigned int* r, const __nv_bfloat16* p) { kda_cuda::ldmatrix<2, false>(r, p); }
DFN void kda_ldsm2t(unsigned int* r, const __nv_bfloat16* p) { kda_cuda::ldmatrix<2, true>(r, p); }
#else
DFN void kda_ldsm4(unsigned int* r, const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(kda_smem(p)));
}
DFN void kda_ldsm4t(unsigned int* r, const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(kda_smem(p)));
}
DFN void kda_ldsm2(unsigned int* r, const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(kda_smem(p)));
}
DFN void kda_ldsm2t(unsigned int* r, const __nv_bfloat16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(kda_smem(p)));
}
#endif
template <bool TA, int P>
DFN void frag_load_a(FragA<P>& a, const __nv_bfloat16* p, int ld, int m0, int k0) {
  static_assert(P == PREC_BF16, "bf16 tiles take bf16 products");
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (!TA) {  // matrices (rows, k): (0-7, 0-7) (8-15, 0-7) (0-7, 8-15) (8-15, 8-15)
    const int j = lane >> 3, i = lane & 7;
    kda_ldsm4(a.x, p + (long)(m0 + i + 8 * (j & 1)) * ld + k0 + 8 * (j >> 1));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = m0 + g + 8 * (i & 1), c = k0 + 2 * t + 8 * (i >> 1);
      a.x[i] = kda_pair2(p + (long)c * ld + r, ld);
    }
  }
}
// B(k, n) = TB ? p[n*ld + k] (rows n: plain ldmatrix) : p[k*ld + n] (rows k: .trans)
template <bool TB, int P>
DFN void frag_load_b(FragB<P>& b, const __nv_bfloat16* p, int ld, int k0, int n0) {
  static_assert(P == PREC_BF16, "bf16 tiles take bf16 products");
  const int lane = threadIdx.x & 31, j = (lane >> 3) & 1, i = lane & 7;  // lanes 16-31: ignored
  if (TB) kda_ldsm2(b.x, p + (long)(n0 + i) * ld + k0 + 8 * j);
  else kda_ldsm2t(b.x, p + (long)(k0 + i + 8 * j) * ld + n0);
}
// the B fragments of columns n0.. and n0 + 8.. in one ldmatrix.x4
template <bool TB, int P>
DFN void frag_load_b2(FragB<P>& b0, FragB<P>& b1, const __nv_bfloat16* p, int ld, int k0, int n0) {
  static_assert(P == PREC_BF16, "bf16 tiles take bf16 products");
  const int lane = threadIdx.x & 31, j = lane >> 3, i = lane & 7;
  unsigned int r[4];
  if (TB) kda_ldsm4(r, p + (long)(n0 + i + 8 * (j >> 1)) * ld + k0 + 8 * (j & 1));
  else kda_ldsm4t(r, p + (long)(k0 + i + 8 * (j & 1)) * ld + n0 + 8 * (j >> 1));
  b0.x[0] = r[0]; b0.x[1] = r[1]; b1.x[0] = r[2]; b1.x[1] = r[3];
}
template <bool TB, int P>
DFN void frag_load_b2(FragB<P>& b0, FragB<P>& b1, const float* p, int ld, int k0, int n0) {
  frag_load_b<TB>(b0, p, ld, k0, n0);
  frag_load_b<TB>(b1, p, ld, k0, n0 + 8);
}
#define TILE_PTR(TY, base, off) (reinterpret_cast<TY*>((base) + (off)))
"""

METAL_PROLOGUE = r"""
  const int _tid = (int)thread_index_in_threadgroup;
  const int _warp = (int)simdgroup_index_in_threadgroup;
  const int _lane = (int)thread_index_in_simdgroup;
  const int _gx = (int)threadgroup_position_in_grid.x;
  const int _gy = (int)threadgroup_position_in_grid.y;
  const int _gz = (int)threadgroup_position_in_grid.z;
"""

CUDA_PROLOGUE = r"""
  const int _tid = (int)threadIdx.x;
  const int _warp = (int)(threadIdx.x >> 5);
  const int _lane = (int)(threadIdx.x & 31);
  const int _gx = (int)blockIdx.x;
  const int _gy = (int)blockIdx.y;
  const int _gz = (int)blockIdx.z;
"""

# Tile memory of SMEM_FLOATS floats per threadgroup, as `smem`.
METAL_SMEM = r"""
  device float* smem = scratch + ((long)(_gz * (int)threadgroups_per_grid.y + _gy) * (int)threadgroups_per_grid.x + _gx) * (long)SMEM_FLOATS;
"""

CUDA_SMEM = r"""
  extern __shared__ float4 kda_smem4[];
  float* smem = reinterpret_cast<float*>(kda_smem4);
"""


@dataclass(frozen=True)
class Dialect:
    name: str
    header: str
    prologue: str
    smem: str
    scratch_output: bool  # tiles live in a device scratch output (Metal) instead of shared memory


METAL = Dialect("metal", METAL_HEADER, METAL_PROLOGUE, METAL_SMEM, True)
CUDA = Dialect("cuda", CUDA_HEADER, CUDA_PROLOGUE, CUDA_SMEM, False)

DIALECTS = {"metal": METAL, "cuda": CUDA}
