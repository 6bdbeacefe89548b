// Shared parts of st_jax's native CPU kernels (ivf_scan_cpu.cc, flat_scan_cpu.cc): candidate
// keys, int8 dots and the work-sharing helper over XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define ST_VNNI 1
#endif
#if defined(__AVX2__)  // (also on VNNI CPUs: the dots of widths that are no multiple of 64)
#include <immintrin.h>
#define ST_AVX2 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace st_native {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Float <-> unsigned bits in the same order (-0 below +0).
inline uint32_t ordered(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float unordered(uint32_t u) {
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// A candidate as one integer key, smaller = better: the score's order-preserving bits,
// inverted, then a 32-bit position, so equal scores come in position order (lax.top_k's
// order when the position is the index in the scored row). The order is lax.top_k's total
// order: +0 above -0 (an underflowing negative score), and the score kept as it is.
inline uint64_t key_of(float v, uint32_t pos) {
  return (static_cast<uint64_t>(~ordered(v)) << 32) | pos;
}

// The row a result slot reports: -1 for a -inf score (an eligible row whose score
// overflowed), which the XLA twins cannot tell from padding either.
inline int32_t reported_row(float v, int64_t row) {
  return v > kNegInf ? static_cast<int32_t>(row) : -1;
}

inline float score_of(uint64_t key) { return unordered(~static_cast<uint32_t>(key >> 32)); }

inline uint32_t pos_of(uint64_t key) { return static_cast<uint32_t>(key); }

// The best `kk` keys of a candidate buffer: cuts it to them (nth_element) and returns the
// score of the worst kept one, the new threshold (candidates below it can never enter).
inline float cut_to_best(std::vector<uint64_t>& cand, int64_t kk) {
  std::nth_element(cand.begin(), cand.begin() + (kk - 1), cand.end());
  cand.resize(kk);
  return score_of(cand[kk - 1]);
}

// The best min(kk, size) keys of a candidate buffer, best first; returns their number.
inline int64_t best_sorted(std::vector<uint64_t>& cand, int64_t kk) {
  const int64_t m = std::min<int64_t>(kk, cand.size());
  if (static_cast<int64_t>(cand.size()) > m) cut_to_best(cand, m);
  std::sort(cand.begin(), cand.end());
  return m;
}

#ifdef ST_AVX2
// 16 signed bytes at p, sign-extended to 16 int16 lanes.
inline __m256i widen16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The sum of the 8 int32 lanes of a.
inline int32_t hsum8(__m256i a) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Lane e of the result: the sum of the 8 int32 lanes of a[e].
inline __m256i hsum8x8(const __m256i a[8]) {
  const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]),
                                       _mm256_hadd_epi32(a[2], a[3]));
  const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]),
                                       _mm256_hadd_epi32(a[6], a[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                          _mm256_permute2x128_si256(h0, h1, 0x31));
}
#endif

// Exact int32 dots of n rows (row stride d) with the query q.
inline void dots(const int8_t* q, const int8_t* x, int64_t n, int64_t d, int32_t* out) {
#ifdef ST_VNNI
  if (d % 64 == 0 && d <= 512) {
    // vpdpbusd multiplies unsigned by signed bytes: feed x + 128 (x ^ 0x80) and subtract
    // 128 * sum(q). Every partial sum fits in int32 (|sum| <= 255 * 128 * d).
    const int64_t nc = d / 64;
    __m512i qv[8];
    int32_t qsum = 0;
    for (int64_t c = 0; c < nc; ++c) qv[c] = _mm512_loadu_si512(q + 64 * c);
    for (int64_t j = 0; j < d; ++j) qsum += q[j];
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      const int8_t* x0 = x + r * d;
      for (int64_t c = 0; c < nc; ++c) {
        a0 = _mm512_dpbusd_epi32(
            a0, _mm512_xor_si512(_mm512_loadu_si512(x0 + 64 * c), flip), qv[c]);
        a1 = _mm512_dpbusd_epi32(
            a1, _mm512_xor_si512(_mm512_loadu_si512(x0 + d + 64 * c), flip), qv[c]);
        a2 = _mm512_dpbusd_epi32(
            a2, _mm512_xor_si512(_mm512_loadu_si512(x0 + 2 * d + 64 * c), flip), qv[c]);
        a3 = _mm512_dpbusd_epi32(
            a3, _mm512_xor_si512(_mm512_loadu_si512(x0 + 3 * d + 64 * c), flip), qv[c]);
      }
      out[r] = _mm512_reduce_add_epi32(a0) - 128 * qsum;
      out[r + 1] = _mm512_reduce_add_epi32(a1) - 128 * qsum;
      out[r + 2] = _mm512_reduce_add_epi32(a2) - 128 * qsum;
      out[r + 3] = _mm512_reduce_add_epi32(a3) - 128 * qsum;
    }
    // the last n % 4 rows (bounded explicitly: GCC cannot bound `r < n` from the loop above
    // and warned that a 2^62nd iteration would overflow `out`)
    for (int t = 0; t < 3 && r < n; ++t, ++r) {
      __m512i a = _mm512_setzero_si512();
      for (int64_t c = 0; c < nc; ++c)
        a = _mm512_dpbusd_epi32(
            a, _mm512_xor_si512(_mm512_loadu_si512(x + r * d + 64 * c), flip), qv[c]);
      out[r] = _mm512_reduce_add_epi32(a) - 128 * qsum;
    }
    return;
  }
#endif
#ifdef ST_AVX2
  if (d % 16 == 0 && d <= 512) {
    // bytes sign-extended to int16, vpmaddwd: exact int32 pair sums; 4 rows at a time
    const int64_t nc = d / 16;
    __m256i qv[32];
    for (int64_t c = 0; c < nc; ++c) qv[c] = widen16(q + 16 * c);
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {
      __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
      const int8_t* x0 = x + r * d;
      for (int64_t c = 0; c < nc; ++c) {
        a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(widen16(x0 + 16 * c), qv[c]));
        a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(widen16(x0 + d + 16 * c), qv[c]));
        a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(widen16(x0 + 2 * d + 16 * c), qv[c]));
        a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(widen16(x0 + 3 * d + 16 * c), qv[c]));
      }
      // lane i of the low half: row i's dwords 0-3 summed; of the high half: dwords 4-7
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r),
                       _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
    for (int t = 0; t < 3 && r < n; ++t, ++r) {  // the last n % 4 rows (bounded: see above)
      __m256i a = _mm256_setzero_si256();
      for (int64_t c = 0; c < nc; ++c)
        a = _mm256_add_epi32(a, _mm256_madd_epi16(widen16(x + r * d + 16 * c), qv[c]));
      out[r] = hsum8(a);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = x + r * d;
    int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j)
      acc += static_cast<int32_t>(q[j]) * static_cast<int32_t>(row[j]);
    out[r] = acc;
  }
}

// Runs fn(unit, worker) for every unit in [0, n) on the caller and up to `workers - 1`
// helper tasks of XLA's intra-op pool, units claimed one at a time; returns when all are
// done. `worker` is in [0, workers): state indexed by it is touched by one thread at a time.
// The caller can finish every unit alone (no deadlock when the pool is busy); a helper that
// starts late finds nothing left and touches only the shared counters (never `fn`, whose
// captures may have gone out of scope by then).
// An exception in fn (std::bad_alloc: no exception may leave an FFI handler, nor a pool
// task) is caught; the remaining units are skipped and parallel_for returns false.
struct Team {
  std::atomic<int64_t> next{0}, done{0}, ids{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::condition_variable cv;
  int64_t n = 0;
  std::function<void(int64_t, int64_t)> fn;

  void work() {
    int64_t finished = 0, worker = -1;
    for (int64_t u; (u = next.fetch_add(1)) < n; ++finished) {
      if (worker < 0) worker = ids.fetch_add(1);
      if (failed.load(std::memory_order_relaxed)) continue;
      try {
        fn(u, worker);
      } catch (...) {
        failed.store(true);
      }
    }
    if (finished && done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(mu);
      cv.notify_all();
    }
  }
};

// The number of workers parallel_for uses for n units (size per-worker state with it).
inline int64_t team_size(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
}

inline bool parallel_for(ffi::ThreadPool& pool, int64_t n,
                         std::function<void(int64_t, int64_t)> fn) {
  if (n <= 0) return true;
  auto team = std::make_shared<Team>();
  team->n = n;
  team->fn = std::move(fn);
  const int64_t helpers = team_size(pool, n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([team] { team->work(); });
  team->work();
  std::unique_lock<std::mutex> lock(team->mu);
  team->cv.wait(lock, [&] { return team->done.load() == n; });
  return !team->failed.load();
}

inline ffi::Error out_of_memory(const char* kernel) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    std::string("st_jax ") + kernel + ": out of memory for the candidates "
                    "(use a smaller k or batch)");
}

// A handler's body, with std::bad_alloc turned into an XLA error.
template <class Body>
ffi::Error guarded(const char* kernel, Body&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return out_of_memory(kernel);
  }
}

// Buffer types of the handlers' signatures (the handler macro cannot take template
// arguments with commas).
using QCodes = ffi::BufferR2<ffi::S8>;
using F32Vec = ffi::BufferR1<ffi::F32>;
using OutV = ffi::BufferR2<ffi::F32>;
using OutR = ffi::BufferR2<ffi::S32>;

// The binding both scans start with: the thread pool, then qc, qs, codes, scale.
inline auto bind_scan() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<QCodes>()    // qc
      .Arg<F32Vec>()    // qs
      .Arg<QCodes>()    // codes
      .Arg<F32Vec>();   // scale
}

}  // namespace st_native
