// The subset of the Metal Shading Language that the KDA kernels use, written in C++20 so that
// g++ can (1) syntax-check the generated Metal source (a typo or an undeclared name fails CI)
// and (2) run it on the CPU: each GPU thread is a std::thread, threadgroup_barrier and
// simdgroup_barrier are std::barriers, and every lane of a simdgroup keeps a full copy of each
// simdgroup_matrix (loads and products are computed redundantly, stores write only the lane's
// own two elements, so the result in memory is the same as on the GPU).
//
// Usage: #include this, then the generated header and kernel, then call kda_emu::launch.
#pragma once
#define KDA_METAL_STUB 1

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long ulong;

struct uint3 { uint x, y, z; };
struct ulong2 {
  ulong x, y;
  ulong2(ulong a = 0, ulong b = 0) : x(a), y(b) {}
};

// MLX names bf16 / f16 template arguments bfloat16_t / float16_t.
struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() : bits(0) {}
  bfloat16_t(float f) {  // round to nearest even
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = 0x7fc0; return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = (uint16_t)(u >> 16);
  }
  operator float() const {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
struct float16_t {
  _Float16 v;
  float16_t() : v(0) {}
  float16_t(float f) : v((_Float16)f) {}
  operator float() const { return (float)v; }
};

namespace kda_emu {
struct Ctx {
  int lane = 0;
  std::barrier<>* tg = nullptr;
  std::barrier<>* sg = nullptr;
  float* slots = nullptr;  // 32 floats shared by the simdgroup
  float* mslots = nullptr;  // 64 floats: one 8x8 matrix gathered from its owners
};
inline thread_local Ctx ctx;
// Apple's 8x8 layout (MLX steel's get_coord): lane l owns (row, col) and (row, col + 1)
inline int own_row(int l) { return ((l / 4) & 4) + ((l / 2) % 4); }
inline int own_col(int l) { return ((l / 4) & 2) * 2 + (l % 2) * 2; }

// Run body(threadgroup_position, threads_per_grid_in_groups, tid, simdgroup, lane) for every
// thread of a (gx, gy, gz) grid of nt-thread threadgroups; threadgroups run one after another.
template <typename F>
void launch(uint gx, uint gy, uint gz, int nt, F body) {
  for (uint z = 0; z < gz; ++z)
    for (uint y = 0; y < gy; ++y)
      for (uint x = 0; x < gx; ++x) {
        const int nsg = (nt + 31) / 32;
        std::barrier<> tg(nt);
        std::vector<std::unique_ptr<std::barrier<>>> sg;
        for (int s = 0; s < nsg; ++s)
          sg.emplace_back(new std::barrier<>(s == nsg - 1 && nt % 32 ? nt % 32 : 32));
        std::vector<float> slots(32 * nsg), mslots(64 * nsg);
        std::vector<std::thread> threads;
        for (int t = 0; t < nt; ++t) {
          threads.emplace_back([&, t]() {
            ctx.lane = t % 32;
            ctx.tg = &tg;
            ctx.sg = sg[t / 32].get();
            ctx.slots = slots.data() + 32 * (t / 32);
            ctx.mslots = mslots.data() + 64 * (t / 32);
            body(uint3{x, y, z}, uint3{gx, gy, gz}, (uint)t, (uint)(t / 32), (uint)(t % 32));
          });
        }
        for (auto& th : threads) th.join();
      }
}
}  // namespace kda_emu

namespace metal {
enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((int)a | (int)b); }
inline void threadgroup_barrier(mem_flags) { kda_emu::ctx.tg->arrive_and_wait(); }
inline void simdgroup_barrier(mem_flags) { kda_emu::ctx.sg->arrive_and_wait(); }

// device atomics (the prefill's SPLIT mode): threadgroups run one after another here, so the
// orderings only matter for the threads of one threadgroup
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
enum thread_scope { thread_scope_thread, thread_scope_simdgroup, thread_scope_threadgroup, thread_scope_device };
struct atomic_int { int v; };
inline int atomic_fetch_add_explicit(atomic_int* p, int x, memory_order) { return __atomic_fetch_add(&p->v, x, __ATOMIC_SEQ_CST); }
inline int atomic_load_explicit(atomic_int* p, memory_order) { return __atomic_load_n(&p->v, __ATOMIC_SEQ_CST); }
inline void atomic_store_explicit(atomic_int* p, int x, memory_order) { __atomic_store_n(&p->v, x, __ATOMIC_SEQ_CST); }
inline void atomic_thread_fence(mem_flags, memory_order, thread_scope) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline float exp(float x) { return std::exp(x); }
inline float exp2(float x) { return std::exp2(x); }
inline float log(float x) { return std::log(x); }
inline float sqrt(float x) { return std::sqrt(x); }
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float abs(float x) { return std::fabs(x); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }
namespace fast { using metal::exp; using metal::log; using metal::rsqrt; }
namespace precise { using metal::exp; using metal::log; using metal::rsqrt; }

inline float simd_sum(float x) {
  auto& c = kda_emu::ctx;
  c.slots[c.lane] = x;
  c.sg->arrive_and_wait();
  float s = 0.0f;
  for (int i = 0; i < 32; ++i) s += c.slots[i];
  c.sg->arrive_and_wait();
  return s;
}
inline float simd_shuffle_xor(float x, ushort m) {
  auto& c = kda_emu::ctx;
  c.slots[c.lane] = x;
  c.sg->arrive_and_wait();
  const float r = c.slots[c.lane ^ m];
  c.sg->arrive_and_wait();
  return r;
}

inline bool simd_all(bool p) {
  auto& c = kda_emu::ctx;
  c.slots[c.lane] = p ? 1.0f : 0.0f;
  c.sg->arrive_and_wait();
  bool r = true;
  for (int i = 0; i < 32 && r; ++i) r = c.slots[i] != 0.0f;
  c.sg->arrive_and_wait();
  return r;
}

// Lane l owns row l/4, columns 2*(l%4) and 2*(l%4)+1 of an 8x8 matrix.
template <typename T>
struct thread_pair_ref {
  T* a;
  T* b;
  void operator*=(T s) { *a *= s; *b *= s; }
  void operator+=(T s) { *a += s; *b += s; }
  T& operator[](int i) { return i ? *b : *a; }
};


template <typename T, int R, int C>
struct simdgroup_matrix {
  T e[R][C];
  thread_pair_ref<T> thread_elements() {
    const int l = kda_emu::ctx.lane;
    const int r = kda_emu::own_row(l), c = kda_emu::own_col(l);
    return {&e[r][c], &e[r][c + 1]};
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;

template <typename T, int R, int C>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, R, C> m;
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < C; ++j) m.e[i][j] = v;
  return m;
}
// origin = (column, row) of the block inside the matrix at src
template <typename T>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& d, const T* src, ulong elements_per_row = 8,
                           ulong2 origin = ulong2(0, 0), bool transpose = false) {
  const T* p = src + origin.y * elements_per_row + origin.x;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      const T v = p[i * elements_per_row + j];
      if (transpose) d.e[j][i] = v; else d.e[i][j] = v;
    }
}
template <typename T>
inline void simdgroup_store(const simdgroup_matrix<T, 8, 8>& s, T* dst, ulong elements_per_row = 8,
                            ulong2 origin = ulong2(0, 0), bool transpose = false) {
  // lanes of a simdgroup run in lockstep on the GPU: no lane stores before all have loaded
  kda_emu::ctx.sg->arrive_and_wait();
  T* p = dst + origin.y * elements_per_row + origin.x;
  const int l = kda_emu::ctx.lane;
  const int i = kda_emu::own_row(l);
  for (int j = kda_emu::own_col(l); j < kda_emu::own_col(l) + 2; ++j) {
    if (transpose) p[j * elements_per_row + i] = s.e[i][j];
    else p[i * elements_per_row + j] = s.e[i][j];
  }
}
template <typename T>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                          const simdgroup_matrix<T, 8, 8>& b,
                                          const simdgroup_matrix<T, 8, 8>& c) {
  simdgroup_matrix<T, 8, 8> r;
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = c.e[i][j];
      for (int k = 0; k < 8; ++k) acc += (float)a.e[i][k] * (float)b.e[k][j];
      r.e[i][j] = (T)acc;
    }
  d = r;
}
}  // namespace metal

namespace kda_emu {
// Every lane keeps a full copy of each matrix here, but after per-lane edits of
// thread_elements() only the owned elements are right (as on the GPU, where that is all a lane
// holds): rebuild the copy from the owners before the matrix is used as a product operand.
template <typename T>
inline void gather_owned(metal::simdgroup_matrix<T, 8, 8>& m) {
  const int r = own_row(ctx.lane), c = own_col(ctx.lane);
  ctx.mslots[r * 8 + c] = m.e[r][c];
  ctx.mslots[r * 8 + c + 1] = m.e[r][c + 1];
  ctx.sg->arrive_and_wait();
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) m.e[i][j] = ctx.mslots[i * 8 + j];
  ctx.sg->arrive_and_wait();
}
}  // namespace kda_emu

// Metal address-space qualifiers. `threadgroup` arrays become statics shared by the threads of
// the (one at a time) running threadgroup; the kernels only use `threadgroup` on arrays.
#define device
#define constant
#define thread
#define threadgroup static
