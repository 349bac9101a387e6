// The subset of CUDA that the CUDA rendering of the kernels uses, in C++20 for g++, so that the
// CUDA text runs on the CPU (as metal_stub.h does for the Metal text): every GPU thread is a
// std::thread, blocks run one after another, __syncthreads and named barriers (bar.sync id, n)
// are std::barriers, and warp-collective instructions (shuffles, votes, ldmatrix, mma.sync)
// gather every lane's operands through per-warp slots. dialect.py's CUDA header calls the
// emulations below in place of its inline PTX when KDA_CUDA_STUB is defined.
//
// Stricter than the hardware where that finds bugs: shared memory starts as NaN bytes,
// cp.async lands only at the cp.async.wait_group that covers it (its destination reads NaN
// until then), collectives check that every lane of the warp runs the same one, ldmatrix and
// cp.async check shared addresses and 16-byte alignment, tf32 operands lose their low 13 bits
// as on the tensor cores, writes past the dynamic shared memory of the launch are reported,
// and a block that stops making progress (a barrier some threads never reach) is reported
// instead of hanging.
//
// Usage: #include this, the rendered header, redefine SHARED_ARR as KDA_CUDA_SHARED_ARR, the
// kernel, then kda_cuda::launch (sources.py: cuda_unit(..., with_main=True)).
#pragma once
#define KDA_CUDA_STUB 1

#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

// Qualifiers. `__shared__` is empty because it also follows `extern` (the dynamic shared
// memory, a namespace-scope buffer below); per-block arrays go through KDA_CUDA_SHARED_ARR.
#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
#define __shared__
#define __grid_constant__
#define __launch_bounds__(...)
#define __location__(x)

struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x = 1, y = 1, z = 1; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

#define MAX_NDIM 10
struct Shape {  // MLX's <name>_shape argument
  int32_t v[MAX_NDIM];
  int32_t operator[](int i) const { return v[i]; }
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

namespace kda_cuda {
[[noreturn]] inline void fail(const char* fmt, ...) {
  std::va_list ap;
  va_start(ap, fmt);
  std::fputs("cuda emulator: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(4);
}
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f2bf(float f) {  // round to nearest even (__float2bfloat16_rn)
  uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf2f(uint16_t b) { return u2f((uint32_t)b << 16); }
}  // namespace kda_cuda

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(kda_cuda::f2bf(f)) {}
  __nv_bfloat16(double f) : __x(kda_cuda::f2bf((float)f)) {}
  __nv_bfloat16(int i) : __x(kda_cuda::f2bf((float)i)) {}
  operator float() const { return kda_cuda::bf2f(__x); }
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__nv_bfloat16(lo), __nv_bfloat16(hi)}; }
struct __half {
  _Float16 __x;
  __half() = default;
  __half(float f) : __x((_Float16)f) {}
  __half(double f) : __x((_Float16)f) {}
  __half(int i) : __x((_Float16)i) {}
  operator float() const { return (float)__x; }
};

// maths (device overloads of min/max; the fast intrinsics as their PTX: ex2.approx.ftz, lg2.approx)
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
namespace kda_cuda {
inline float ftz(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.0f, x) : x; }
inline float ex2_approx_ftz(float x) { return ftz(std::exp2(ftz(x))); }
// cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits (the low 13 bits zero)
inline uint32_t cvt_rna_tf32(float x) {
  const uint32_t u = f2u(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x7fffffu) ? 0x7fffffffu : u;
  return (u + 0x1000u) & 0xffffe000u;
}
}  // namespace kda_cuda
inline float __int_as_float(int i) { return kda_cuda::u2f((uint32_t)i); }
inline float __uint_as_float(unsigned int u) { return kda_cuda::u2f(u); }
inline int __float_as_int(float f) { return (int)kda_cuda::f2u(f); }
inline unsigned int __float_as_uint(float f) { return kda_cuda::f2u(f); }
inline float __expf(float x) { return kda_cuda::ex2_approx_ftz(x * 1.4426950408889634f); }
inline float __logf(float x) { return std::log2(x) * 0.6931471805599453f; }  // lg2.approx (no ftz: an H100 keeps subnormals)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline long long clock64() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline void __nanosleep(unsigned int) { std::this_thread::yield(); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace kda_cuda {
constexpr size_t kSmemCap = 256 * 1024;   // the emulator's dynamic shared memory buffer
constexpr size_t kSmemLimit = 232448;     // what one sm_90 block may take (227 KB)
constexpr int kMaxNamed = 16;

// what a thread is blocked in (reported when a block stops making progress)
enum Where : int { W_RUN, W_SYNCTHREADS, W_SYNCWARP, W_COLLECTIVE, W_NAMED, W_DONE = W_NAMED + kMaxNamed };

struct Warp {
  std::barrier<> bar;
  int nlanes;
  // two slot sets, used alternately: one barrier a collective is enough (a lane cannot start
  // the collective after next before every lane has passed the next one's barrier)
  int op[2][32];
  uint32_t reg[2][32][6];
  const void* ptr[2][32];
  explicit Warp(int n) : bar(n), nlanes(n) {}
};

struct BulkCopy { void* dst; const void* src; size_t bytes; };
// an mbarrier: a phase completes when `count` threads have arrived and every expected byte has
// come; the bulk copies of a completed phase land at the first wait that sees it
struct MBar {
  int count = 0, arrivals = 0;
  long tx = 0;
  unsigned phase = 0;
  std::vector<BulkCopy> issued, done;
};

struct Block {
  int nt;
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::mutex mu;
  std::unique_ptr<std::barrier<>> named[kMaxNamed];
  int named_n[kMaxNamed] = {};
  std::map<std::pair<std::string, int>, std::unique_ptr<unsigned char[]>> statics;
  size_t static_bytes = 0, dyn_bytes = 0;
  std::vector<std::atomic<int>> where;
  std::map<const void*, MBar> mbars;  // by shared address (guarded by mu)
  std::mutex done_mu;
  std::condition_variable done_cv;
  int done = 0;
  Block(int n, size_t dyn) : nt(n), bar(n), dyn_bytes(dyn), where(n) {
    for (int s = 0; s < (n + 31) / 32; ++s) warps.emplace_back(new Warp(s == (n - 1) / 32 && n % 32 ? n % 32 : 32));
  }
};

struct Copy { void* dst; const void* src; bool valid; };
struct Thread {
  int tid = 0, lane = 0;
  Block* blk = nullptr;
  Warp* w = nullptr;
  unsigned int parity = 0;
  std::vector<Copy> pending;        // cp.async issued, not yet waited for
  std::vector<size_t> group_end;    // committed groups: their end in `pending`
};
inline thread_local Thread ctx;
}  // namespace kda_cuda

alignas(128) inline float4 kda_smem4[kda_cuda::kSmemCap / 16];  // CUDA_SMEM's `extern __shared__` buffer

namespace kda_cuda {
inline unsigned char* smem_base() { return reinterpret_cast<unsigned char*>(kda_smem4); }

struct WhereGuard {
  explicit WhereGuard(int w) { ctx.blk->where[ctx.tid].store(w, std::memory_order_relaxed); }
  ~WhereGuard() { ctx.blk->where[ctx.tid].store(W_RUN, std::memory_order_relaxed); }
};

inline unsigned int full_mask() {
  return ctx.w->nlanes == 32 ? 0xffffffffu : ((1u << ctx.w->nlanes) - 1u);
}
inline void check_mask(unsigned int mask, const char* what) {
  if (mask != full_mask()) fail("%s with mask 0x%08x: the emulator (and these kernels) take whole warps", what, mask);
}

// A warp-collective instruction: every lane publishes its operands with fill(slots, lane), then
// (after the warp's barrier, every lane having checked that all ran the same op) computes its
// own result with use(slots, lane).
enum Op : int { OP_SHFL = 1, OP_VOTE, OP_MMA_BF16, OP_MMA_TF32, OP_LDSM };
struct Slots { int* op; uint32_t (*reg)[6]; const void** ptr; };
template <typename Fill, typename Use>
inline auto collective(int op, Fill fill, Use use) {
  Warp& w = *ctx.w;
  const int l = ctx.lane, p = ctx.parity++ & 1;
  Slots s{w.op[p], w.reg[p], w.ptr[p]};
  s.op[l] = op;
  fill(s, l);
  {
    WhereGuard g(W_COLLECTIVE);
    w.bar.arrive_and_wait();
  }
  for (int i = 0; i < w.nlanes; ++i)
    if (s.op[i] != op)
      fail("warp %d: lane %d runs collective %d while lane %d runs %d (divergent warp)", ctx.tid / 32, l, op, i, s.op[i]);
  return use(s, l);
}

template <typename T>
inline T shfl(unsigned int mask, T v, int src_of_lane(int, int, int), int arg, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  check_mask(mask, "shuffle");
  if (width <= 0 || width > 32 || (width & (width - 1))) fail("shuffle width %d", width);
  return collective(OP_SHFL, [&](Slots s, int l) {
    std::memcpy(s.reg[l], &v, sizeof(T));
  }, [&](Slots s, int l) {
    const int src = src_of_lane(l, arg, width);
    T r;
    std::memcpy(&r, s.reg[src < ctx.w->nlanes ? src : l], sizeof(T));
    return r;
  });
}
inline int src_xor(int l, int m, int width) {
  const int t = l ^ m;
  return (t & ~(width - 1)) == (l & ~(width - 1)) ? t : l;
}
inline int src_idx(int l, int s, int width) { return (l & ~(width - 1)) + (s & (width - 1)); }
}  // namespace kda_cuda

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
  return kda_cuda::shfl(mask, v, kda_cuda::src_xor, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int src_lane, int width = 32) {
  return kda_cuda::shfl(mask, v, kda_cuda::src_idx, src_lane, width);
}
inline int __all_sync(unsigned int mask, int pred) {
  using namespace kda_cuda;
  check_mask(mask, "__all_sync");
  return collective(OP_VOTE, [&](Slots s, int l) { s.reg[l][0] = pred != 0; }, [&](Slots s, int) {
    int all = 1;
    for (int i = 0; i < ctx.w->nlanes; ++i) all &= (int)s.reg[i][0];
    return all;
  });
}
inline int __any_sync(unsigned int mask, int pred) {
  using namespace kda_cuda;
  check_mask(mask, "__any_sync");
  return collective(OP_VOTE, [&](Slots s, int l) { s.reg[l][0] = pred != 0; }, [&](Slots s, int) {
    int any = 0;
    for (int i = 0; i < ctx.w->nlanes; ++i) any |= (int)s.reg[i][0];
    return any;
  });
}
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  kda_cuda::check_mask(mask, "__syncwarp");
  kda_cuda::WhereGuard g(kda_cuda::W_SYNCWARP);
  kda_cuda::ctx.w->bar.arrive_and_wait();
}
inline void __syncthreads() {
  kda_cuda::WhereGuard g(kda_cuda::W_SYNCTHREADS);
  kda_cuda::ctx.blk->bar.arrive_and_wait();
}

namespace kda_cuda {
// bar.sync id, n: a barrier of the n threads (whole warps) that use id; id 0 is __syncthreads'
inline void bar_sync(int id, int n) {
  Block& b = *ctx.blk;
  if (id < 0 || id >= kMaxNamed) fail("bar.sync %d: barrier ids are 0..15", id);
  if (n <= 0 || n % 32 || n > b.nt) fail("bar.sync %d, %d: the count must be whole warps of the block (%d threads)", id, n, b.nt);
  if (id == 0) {
    if (n != b.nt) fail("bar.sync 0, %d: barrier 0 is __syncthreads' (%d threads)", n, b.nt);
    __syncthreads();
    return;
  }
  std::barrier<>* bar;
  {
    std::lock_guard<std::mutex> lk(b.mu);
    if (!b.named[id]) {
      b.named[id].reset(new std::barrier<>(n));
      b.named_n[id] = n;
    } else if (b.named_n[id] != n) {
      fail("bar.sync %d, %d: barrier %d was used with %d threads in this block", id, n, id, b.named_n[id]);
    }
    bar = b.named[id].get();
  }
  WhereGuard g(W_NAMED + id);
  bar->arrive_and_wait();
}

// an `__shared__ T name[N]` of the running block: allocated (NaN bytes) by its first thread
inline void* static_shared(const char* name, int line, size_t bytes) {
  Block& b = *ctx.blk;
  std::lock_guard<std::mutex> lk(b.mu);
  auto& p = b.statics[{name, line}];
  if (!p) {
    p.reset(new unsigned char[bytes]);  // (16-byte aligned, as operator new gives)
    std::memset(p.get(), 0xff, bytes);
    b.static_bytes += bytes;
    if (b.static_bytes + b.dyn_bytes > kSmemLimit)
      fail("block needs %zu bytes of shared memory (%zu static + %zu dynamic); sm_90 has %zu",
           b.static_bytes + b.dyn_bytes, b.static_bytes, b.dyn_bytes, kSmemLimit);
  }
  return p.get();
}

// Offset of p in the dynamic shared memory of the launch; ldmatrix / cp.async operands must be
// there (the kernels put every tile in it), `bytes` of them, on an `align`-byte boundary (mbarriers: 8).
inline size_t smem_offset(const void* p, size_t bytes, const char* what, size_t align = 16) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < smem_base() || c + bytes > smem_base() + ctx.blk->dyn_bytes)
    fail("%s: address %p is not in the %zu bytes of dynamic shared memory (thread %d)", what, p, ctx.blk->dyn_bytes, ctx.tid);
  const size_t off = (size_t)(c - smem_base());
  if (off % align) fail("%s: shared address %zu is not %zu-byte aligned (thread %d)", what, off, align, ctx.tid);
  return off;
}

// ldmatrix.sync.aligned.m8n8.xNUM{.trans}.shared.b16: lane 8j + i names row i of matrix j;
// register j of lane l gets (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j, or of its transpose
template <int NUM, bool TRANS>
inline void ldmatrix(unsigned int* r, const void* p) {
  collective(OP_LDSM + 2 * NUM + TRANS, [&](Slots s, int l) { s.ptr[l] = p; }, [&](Slots s, int l) {
    for (int i = 0; i < 8 * NUM; ++i) smem_offset(s.ptr[i], 16, "ldmatrix");
    for (int j = 0; j < NUM; ++j) {
      uint16_t e[2];
      for (int h = 0; h < 2; ++h) {
        const int row = TRANS ? 2 * (l % 4) + h : l / 4, col = TRANS ? l / 4 : 2 * (l % 4) + h;
        std::memcpy(&e[h], static_cast<const unsigned char*>(s.ptr[8 * j + row]) + 2 * col, 2);
      }
      r[j] = (uint32_t)e[0] | ((uint32_t)e[1] << 16);
    }
    return 0;
  });
}

// mma.sync m16n8kK, fp32 accumulate, g = lane/4, t = lane%4. A register r of lane l holds KP
// operands (KP = 2 bf16, 1 tf32) of row g + 8 (r % 2), columns KP t.. + K/2 (r / 2); B registers
// 4 and 5 hold rows KP t.. + K/2 (r - 4) of column g; C {(g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1)}.
// bf16 (K 16): A {(g,2t..) (g+8,2t..) (g,2t+8..) (g+8,2t+8..)}, B {(2t..,g) (2t+8..,g)}, the low
// half of a register the lower column (A) or row (B); tf32 (K 8): A {(g,t) (g+8,t) (g,t+4) (g+8,t+4)},
// B {(t,g) (t+4,g)}. operand(reg, i) decodes operand i of a register.
template <int K, int KP, typename Operand>
inline void mma_m16n8(Op op, float* c, const unsigned int* a, const unsigned int* b, Operand operand) {
  constexpr int KH = K / 2;
  collective(op, [&](Slots s, int l) {
    for (int i = 0; i < 4; ++i) s.reg[l][i] = a[i];
    s.reg[l][4] = b[0];
    s.reg[l][5] = b[1];
  }, [&](Slots s, int l) {
    for (int e = 0; e < 4; ++e) {
      const int row = l / 4 + 8 * (e >> 1), col = 2 * (l % 4) + (e & 1);
      double acc = 0.0;
      for (int k = 0; k < K; ++k) {
        const float av = operand(s.reg[4 * (row % 8) + (k % KH) / KP][row / 8 + 2 * (k / KH)], k % KP);
        const float bv = operand(s.reg[4 * col + (k % KH) / KP][4 + k / KH], k % KP);
        acc += (double)av * (double)bv;
      }
      c[e] = (float)((double)c[e] + acc);
    }
    return 0;
  });
}
inline void mma_bf16_m16n8k16(float* c, const unsigned int* a, const unsigned int* b) {
  mma_m16n8<16, 2>(OP_MMA_BF16, c, a, b,
                   [](uint32_t reg, int i) { return bf2f((uint16_t)(i ? reg >> 16 : reg & 0xffffu)); });
}
// the tensor cores read 19 bits of each tf32 operand
inline void mma_tf32_m16n8k8(float* c, const unsigned int* a, const unsigned int* b) {
  mma_m16n8<8, 1>(OP_MMA_TF32, c, a, b, [](uint32_t reg, int) { return u2f(reg & 0xffffe000u); });
}

// cp.async.cg.shared.global 16 bytes (zeros when !valid). The copy lands at the
// cp.async.wait_group that covers its group; until then its destination holds NaN bytes.
inline void cp_async16(void* dst, const void* src, bool valid) {
  smem_offset(dst, 16, "cp.async destination");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async: source %p is not 16-byte aligned", src);
  std::memset(dst, 0xff, 16);
  ctx.pending.push_back({dst, src, valid});
}
inline void cp_async_commit() { ctx.group_end.push_back(ctx.pending.size()); }
inline void cp_async_wait(int n) {  // every committed group but the newest n lands
  auto& ge = ctx.group_end;
  if ((int)ge.size() <= n) return;
  const size_t k = ge.size() - n, upto = ge[k - 1];
  for (size_t i = 0; i < upto; ++i) {
    const Copy& c = ctx.pending[i];
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
  ctx.pending.erase(ctx.pending.begin(), ctx.pending.begin() + upto);
  ge.erase(ge.begin(), ge.begin() + k);
  for (auto& e : ge) e -= upto;
}
// mbarrier.init / arrive.expect_tx / try_wait.parity and cp.async.bulk global -> shared (sm_90).
// A bulk copy's destination holds NaN bytes until a wait sees its phase complete.
inline MBar& mbar_of(const void* bar, const char* what) {
  auto it = ctx.blk->mbars.find(bar);
  if (it == ctx.blk->mbars.end()) fail("%s: no mbarrier was initialised at %p (thread %d)", what, bar, ctx.tid);
  return it->second;
}
inline void mbar_complete_if(MBar& m) {
  if (m.arrivals < m.count || m.tx != 0) return;
  m.done.insert(m.done.end(), m.issued.begin(), m.issued.end());
  m.issued.clear();
  m.arrivals = 0;
  ++m.phase;
}
inline void mbar_init(void* bar, int count) {
  smem_offset(bar, 8, "mbarrier.init", 8);
  std::lock_guard<std::mutex> lk(ctx.blk->mu);
  MBar& m = ctx.blk->mbars[bar];
  m = MBar();
  m.count = count;
}
inline void mbar_expect(void* bar, int bytes) {
  std::lock_guard<std::mutex> lk(ctx.blk->mu);
  MBar& m = mbar_of(bar, "mbarrier.arrive.expect_tx");
  if (++m.arrivals > m.count) fail("mbarrier.arrive: more than %d arrivals in a phase (thread %d)", m.count, ctx.tid);
  m.tx += bytes;
  mbar_complete_if(m);
}
inline void bulk_copy(void* dst, const void* src, int bytes, void* bar) {
  if (bytes <= 0 || bytes % 16) fail("cp.async.bulk: %d bytes is not a positive multiple of 16", bytes);
  if (reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async.bulk: source %p is not 16-byte aligned", src);
  smem_offset(dst, bytes, "cp.async.bulk destination");
  std::memset(dst, 0xff, bytes);
  std::lock_guard<std::mutex> lk(ctx.blk->mu);
  MBar& m = mbar_of(bar, "cp.async.bulk");
  m.issued.push_back({dst, src, (size_t)bytes});
  m.tx -= bytes;
  mbar_complete_if(m);
}
inline void mbar_wait(void* bar, int parity) {  // until the phase of this parity has completed
  for (;;) {
    {
      std::lock_guard<std::mutex> lk(ctx.blk->mu);
      MBar& m = mbar_of(bar, "mbarrier.try_wait");
      if ((int)(m.phase & 1) != parity) {
        for (const BulkCopy& c : m.done) std::memcpy(c.dst, c.src, c.bytes);
        m.done.clear();
        return;
      }
    }
    std::this_thread::yield();
  }
}
inline int ld_acquire(const int* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void st_release(int* p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
}  // namespace kda_cuda

inline size_t __cvta_generic_to_shared(const void* p) { return kda_cuda::smem_offset(p, 1, "__cvta_generic_to_shared"); }

// `__shared__ T name[N]` inside a kernel (dialect.py's SHARED_ARR): one array per block
#define KDA_CUDA_SHARED_ARR(T, name, N) \
  T(&name)[N] = *reinterpret_cast<T(*)[N]>(::kda_cuda::static_shared(#name, __LINE__, sizeof(T) * (N)))

namespace kda_cuda {
inline double timeout_s() {
  const char* e = std::getenv("KDA_EMU_TIMEOUT");
  return e ? std::atof(e) : 300.0;
}

// Run body() as every thread of a grid of nt-thread blocks with smem_bytes of dynamic shared
// memory; blocks run one after another (x fastest, as CUDA numbers them).
template <typename F>
void launch(dim3 grid, int nt, size_t smem_bytes, F body) {
  if (nt <= 0 || nt > 1024) fail("%d threads a block (1..1024)", nt);
  if (smem_bytes > kSmemLimit) fail("%zu bytes of dynamic shared memory; sm_90 has %zu", smem_bytes, kSmemLimit);
  unsigned char* sm = smem_base();
  for (unsigned int z = 0; z < grid.z; ++z)
    for (unsigned int y = 0; y < grid.y; ++y)
      for (unsigned int x = 0; x < grid.x; ++x) {
        Block blk(nt, smem_bytes);
        std::memset(sm, 0xff, smem_bytes);                    // uninitialised: NaN
        std::memset(sm + smem_bytes, 0xa5, kSmemCap - smem_bytes);  // past the end: a canary
        std::vector<std::thread> threads;
        for (int t = 0; t < nt; ++t) {
          threads.emplace_back([&, t]() {
            threadIdx = {(unsigned int)t, 0, 0};
            blockIdx = {x, y, z};
            blockDim = {(unsigned int)nt, 1, 1};
            gridDim = grid;
            ctx = Thread();
            ctx.tid = t;
            ctx.lane = t % 32;
            ctx.blk = &blk;
            ctx.w = blk.warps[t / 32].get();
            body();
            blk.where[t].store(W_DONE);
            std::lock_guard<std::mutex> lk(blk.done_mu);
            if (++blk.done == nt) blk.done_cv.notify_all();
          });
        }
        {
          std::unique_lock<std::mutex> lk(blk.done_mu);
          if (!blk.done_cv.wait_for(lk, std::chrono::duration<double>(timeout_s()), [&] { return blk.done == nt; })) {
            std::fprintf(stderr, "cuda emulator: block (%u, %u, %u) made no progress for %g s (KDA_EMU_TIMEOUT); threads:\n",
                         x, y, z, timeout_s());
            for (int t = 0; t < nt; ++t) {
              const int w = blk.where[t].load();
              const char* names[] = {"running", "__syncthreads", "__syncwarp", "warp collective"};
              if (w < W_NAMED) std::fprintf(stderr, "  %d: %s\n", t, names[w]);
              else if (w < W_DONE) std::fprintf(stderr, "  %d: bar.sync %d\n", t, w - W_NAMED);
            }
            std::fflush(stderr);
            std::_Exit(5);
          }
        }
        for (auto& th : threads) th.join();
        for (size_t i = smem_bytes; i < kSmemCap; ++i)
          if (sm[i] != 0xa5) fail("block (%u, %u, %u) wrote shared memory byte %zu, past the %zu bytes of the launch", x, y, z, i, smem_bytes);
      }
}
}  // namespace kda_cuda
