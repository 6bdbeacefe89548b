// Native CPU flat scan: pallas_kernels.flat_scan's contract as an XLA FFI handler.
//
// The masked Int8 top-k over a whole item matrix (the flat index, and the IVF search's
// fallback for starved queries). Its XLA twin (flat_topk_reference) is the reference; this
// kernel returns the exact top-k in lax.top_k's order: the same scores ((float(dot) *
// scale[row]) * qs[b], the twin's order of float operations), best first, equal scores by
// ascending row.
//
// Inputs: qc s8[B, D] quantised queries, qs f32[B] their scales, codes s8[N, D], scale
// f32[N], mask u32[M, W] eligibility words (W = ceil(N / 32); M = 0: every row eligible,
// M = 1: one mask for the batch, M = B: one per query). Attributes: k, num_valid (rows from
// num_valid on are padding, never returned). Outputs: f32[B, k] scores (-inf padded), s32[B, k]
// rows (-1 padded).
//
// The rows are cut into tiles of 128, shared out over XLA's intra-op thread pool. A tile's
// rows eligible for some query of the batch (all of them unfiltered; a selective filter
// leaves few, and a tile without one is skipped unread) are gathered once into a VNNI
// layout (16 rows x 4 bytes per 64-byte vector, the bytes biased by 128), and every query of
// the batch is scored against them there: blocks of 4 queries x 64 rows held in 16
// accumulators, AVX-512 VNNI vpdpbusd, where the CPU has it. Without VNNI, AVX2 (D a
// multiple of 16): blocks of 4 queries x 2 rows read in place, the bytes sign-extended to
// int16 and multiplied by vpmaddwd (exact), 8 dots reduced and compared at once; else a plain
// loop row by row. Each worker keeps per query a buffer of candidate keys (score bits, then
// row) above its running threshold, cut to the best kk by nth_element when it reaches 2 kk;
// the workers' buffers are merged per query at the end. No [B, N] temporary is written.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using namespace st_native;

constexpr int64_t kUnit = 4096;  // rows per work unit (a multiple of 32: whole mask words)
constexpr int64_t kTile = 128;   // eligible rows scored together (a multiple of 16)

struct FlatArgs {
  const int8_t* qc;
  const float* qs;
  const int8_t* codes;
  const float* scale;
  const uint32_t* mask;
  int64_t B, D, W, M, num_valid, kk;
  int64_t nj;                   // 4-byte column groups of a row (ceil(D / 4))
  const int32_t* qw;            // [B, nj] the queries' 4-byte groups (zero padded)
  const int32_t* qsum;          // [B] sum of each query's codes
  const int16_t* q16;           // [B, D] the queries sign-extended (the AVX2 blocks)
  bool interleave;              // the VNNI layout (else dots row by row)
  bool blocks;                  // AVX2 without VNNI: 4 queries x 2 rows per step
  std::atomic<uint32_t>* best;  // [B] the highest worker threshold so far (ordered bits)
};

struct Worker {
  std::vector<std::vector<uint64_t>> cand;  // [B] candidate keys
  std::vector<float> thr;                   // [B] running thresholds
  std::vector<int32_t> rows;                // the tile's rows eligible for some query
  std::vector<float> sc;                    // their scales
  std::vector<uint8_t> xt;                  // their codes in the VNNI layout
  std::vector<int32_t> dot;                 // row-by-row dots (the plain path)
};

// Query b's threshold for worker w: its own, or a higher one another worker published (that
// worker holds kk candidates at or above it, so a row below it cannot be in the top kk).
inline float threshold(const FlatArgs& a, Worker& w, int64_t b) {
  const float shared = unordered(a.best[b].load(std::memory_order_relaxed));
  if (shared > w.thr[b]) w.thr[b] = shared;
  return w.thr[b];
}

// Offers row `row` with score v to query b's candidates (`check`: test b's own mask bit).
inline void offer(const FlatArgs& a, Worker& w, int64_t b, float v, int32_t row, bool check) {
  if (v < w.thr[b]) return;
  if (check && !((a.mask[b * a.W + (row >> 5)] >> (row & 31)) & 1u)) return;
  std::vector<uint64_t>& c = w.cand[b];
  c.push_back(key_of(v, static_cast<uint32_t>(row)));
  if (static_cast<int64_t>(c.size()) >= 2 * a.kk) {
    w.thr[b] = cut_to_best(c, a.kk);
    const uint32_t mine = ordered(w.thr[b]);
    uint32_t seen = a.best[b].load(std::memory_order_relaxed);
    while (seen < mine && !a.best[b].compare_exchange_weak(seen, mine)) {
    }
  }
}

#ifdef ST_VNNI  // the VNNI layout and its scoring
// 16 x 16 transpose of 32-bit elements: r[i] holds row i's 16 dwords; afterwards r[j]
// holds dword j of rows 0-15.
inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + e], lane l: dword 4l + e of rows 4i .. 4i + 3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// The rows of w.rows (padded to whole groups of 16) into w.xt: group g, column group j at
// byte (g * nj + j) * 64, row i of the group at 4 i; each byte biased by 128 (x ^ 0x80), the
// column padding past D holding the bias (times a zero query byte: nothing).
void interleave(const FlatArgs& a, Worker& w, int64_t ng) {
  const int64_t nj = a.nj, D = a.D;
  uint8_t* xt = w.xt.data();
  if (D % 64 == 0) {
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    __m512i r[16];
    for (int64_t g = 0; g < ng; ++g) {
      const int32_t* rows = w.rows.data() + 16 * g;
      for (int64_t c = 0; c < D / 64; ++c) {
        for (int i = 0; i < 16; ++i)
          r[i] = _mm512_xor_si512(_mm512_loadu_si512(a.codes + rows[i] * D + 64 * c), flip);
        transpose16(r);
        uint8_t* out = xt + (g * nj + 16 * c) * 64;
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(out + 64 * j, r[j]);
      }
    }
    return;
  }
  for (int64_t g = 0; g < ng; ++g) {
    for (int i = 0; i < 16; ++i) {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(a.codes + w.rows[16 * g + i] * D);
      for (int64_t j = 0; j < nj; ++j) {
        uint8_t* dst = xt + (g * nj + j) * 64 + 4 * i;
        for (int t = 0; t < 4; ++t) dst[t] = (4 * j + t < D ? src[4 * j + t] : 0) ^ 0x80;
      }
    }
  }
}

// Scores queries b0 .. b0 + QB - 1 against groups g0 .. g0 + GB - 1 of the tile and offers
// the eligible ones above the thresholds. `aligned`: the tile is n_e consecutive rows from a
// multiple of 32, so a per-query mask gives each group's 16 bits directly (else each hit's
// bit is tested).
template <int QB, int GB>
void score_block(const FlatArgs& a, Worker& w, int64_t b0, int64_t g0, int64_t n_e,
                 bool aligned) {
  __m512i acc[QB][GB];
  for (int qi = 0; qi < QB; ++qi)
    for (int gi = 0; gi < GB; ++gi) acc[qi][gi] = _mm512_setzero_si512();
  const uint8_t* xt = w.xt.data() + g0 * a.nj * 64;
  const int32_t* qw = a.qw + b0 * a.nj;
  for (int64_t j = 0; j < a.nj; ++j) {
    __m512i x[GB];
    for (int gi = 0; gi < GB; ++gi) x[gi] = _mm512_loadu_si512(xt + (gi * a.nj + j) * 64);
    for (int qi = 0; qi < QB; ++qi) {
      const __m512i qb = _mm512_set1_epi32(qw[qi * a.nj + j]);
      for (int gi = 0; gi < GB; ++gi) acc[qi][gi] = _mm512_dpbusd_epi32(acc[qi][gi], x[gi], qb);
    }
  }
  const bool per_query = a.M > 1, check = per_query && !aligned;
  alignas(64) float s[16];
  for (int gi = 0; gi < GB; ++gi) {
    const int64_t g = g0 + gi;
    const __m512 sc = _mm512_loadu_ps(w.sc.data() + 16 * g);
    const int64_t left = n_e - 16 * g;
    const uint32_t valid = left >= 16 ? 0xFFFFu : (1u << left) - 1;
    const int64_t first = w.rows[16 * g];  // aligned: the group's rows are first .. first + 15
    for (int qi = 0; qi < QB; ++qi) {
      const int64_t b = b0 + qi;
      uint32_t ok = valid;
      if (per_query && aligned) ok &= a.mask[b * a.W + (first >> 5)] >> (first & 31);
      if (!(ok & 0xFFFFu)) continue;
      const __m512i dot = _mm512_sub_epi32(acc[qi][gi], _mm512_set1_epi32(128 * a.qsum[b]));
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), sc),
                                     _mm512_set1_ps(a.qs[b]));
      uint32_t hit = _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(ok), v,
                                             _mm512_set1_ps(threshold(a, w, b)), _CMP_GE_OQ);
      if (!hit) continue;
      _mm512_store_ps(s, v);
      while (hit) {
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        offer(a, w, b, s[t], w.rows[16 * g + t], check);
      }
    }
  }
}

template <int QB>
void score_queries(const FlatArgs& a, Worker& w, int64_t b0, int64_t ng, int64_t n_e,
                   bool aligned) {
  int64_t g = 0;
  for (; g + 4 <= ng; g += 4) score_block<QB, 4>(a, w, b0, g, n_e, aligned);
  switch (ng - g) {
    case 3: score_block<QB, 3>(a, w, b0, g, n_e, aligned); break;
    case 2: score_block<QB, 2>(a, w, b0, g, n_e, aligned); break;
    case 1: score_block<QB, 1>(a, w, b0, g, n_e, aligned); break;
    default: break;
  }
}
#endif

#if defined(ST_AVX2) && !defined(ST_VNNI)  // AVX2: blocks of queries x rows, no layout change
// Scores the tile's n_e rows (w.rows) against queries b0 .. b0 + nq - 1 (nq <= 4) and offers
// the ones above the thresholds: 2 rows at a time, 4 x 2 accumulators of vpmaddwd pair sums
// (bytes sign-extended to int16: exact), reduced to one vector of 8 dots (lane 2 qi + ri),
// scored in the twin's order ((dot * scale) * qs) and compared with the thresholds at once.
// Missing queries (nq < 4) and rows (an odd tail) repeat the last one, their lanes unused.
void score_blocks(const FlatArgs& a, Worker& w, int64_t b0, int64_t nq, int64_t n_e) {
  const int64_t D = a.D, nc = D / 16;
  const bool check = a.M > 1;
  const int16_t* qv[4];
  alignas(32) float qs[8], thr[8], s[8];
  for (int qi = 0; qi < 4; ++qi) {
    const int64_t b = b0 + std::min<int64_t>(qi, nq - 1);
    qv[qi] = a.q16 + b * D;
    qs[2 * qi] = qs[2 * qi + 1] = a.qs[b];
  }
  const __m256 qsv = _mm256_load_ps(qs);
  auto thresholds = [&]() {
    for (int qi = 0; qi < 4; ++qi)
      thr[2 * qi] = thr[2 * qi + 1] = threshold(a, w, b0 + std::min<int64_t>(qi, nq - 1));
    return _mm256_load_ps(thr);
  };
  __m256 thrv = thresholds();
  const uint32_t query_lanes = (1u << (2 * nq)) - 1;
  for (int64_t i = 0; i < n_e; i += 2) {
    const int32_t row0 = w.rows[i], row1 = i + 1 < n_e ? w.rows[i + 1] : row0;
    const int8_t* x0 = a.codes + row0 * D;
    const int8_t* x1 = a.codes + row1 * D;
    __m256i acc[8];
    for (int e = 0; e < 8; ++e) acc[e] = _mm256_setzero_si256();
    for (int64_t c = 0; c < nc; ++c) {
      const __m256i r0 = widen16(x0 + 16 * c), r1 = widen16(x1 + 16 * c);
      for (int qi = 0; qi < 4; ++qi) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qv[qi] + 16 * c));
        acc[2 * qi] = _mm256_add_epi32(acc[2 * qi], _mm256_madd_epi16(r0, q));
        acc[2 * qi + 1] = _mm256_add_epi32(acc[2 * qi + 1], _mm256_madd_epi16(r1, q));
      }
    }
    const float s0 = a.scale[row0], s1 = a.scale[row1];
    const __m256 v = _mm256_mul_ps(
        _mm256_mul_ps(_mm256_cvtepi32_ps(hsum8x8(acc)), _mm256_setr_ps(s0, s1, s0, s1, s0, s1, s0, s1)),
        qsv);
    uint32_t hit = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, thrv, _CMP_GE_OQ)));
    hit &= query_lanes & (i + 1 < n_e ? 0xFFu : 0x55u);
    if (!hit) continue;
    _mm256_store_ps(s, v);
    while (hit) {
      const int e = __builtin_ctz(hit);
      hit &= hit - 1;
      offer(a, w, b0 + e / 2, s[e], e % 2 ? row1 : row0, check);
    }
    thrv = thresholds();  // offers may have raised them
  }
}
#endif

// Scores the n_e rows of w.rows (a tile: up to kTile rows eligible for some query, in
// ascending order) against every query of the batch.
void score_tile(const FlatArgs& a, Worker& w, int64_t n_e) {
  const int32_t* rows = w.rows.data();
  const bool contiguous = rows[n_e - 1] - rows[0] == n_e - 1;
  if (!contiguous)  // scattered rows: no hardware prefetch
    for (int64_t i = 0; i < n_e; ++i)
      for (int64_t c = 0; c < a.D; c += 64) __builtin_prefetch(a.codes + rows[i] * a.D + c);
#ifdef ST_VNNI
  if (a.interleave) {
    const int64_t ng = (n_e + 15) / 16;
    const bool aligned = contiguous && rows[0] % 32 == 0;
    for (int64_t i = 0; i < n_e; ++i) w.sc[i] = a.scale[rows[i]];
    for (int64_t i = n_e; i < 16 * ng; ++i) {  // padding: a real row, never offered
      w.rows[i] = rows[0];
      w.sc[i] = 0.0f;
    }
    interleave(a, w, ng);
    int64_t b = 0;
    for (; b + 4 <= a.B; b += 4) score_queries<4>(a, w, b, ng, n_e, aligned);
    switch (a.B - b) {
      case 3: score_queries<3>(a, w, b, ng, n_e, aligned); break;
      case 2: score_queries<2>(a, w, b, ng, n_e, aligned); break;
      case 1: score_queries<1>(a, w, b, ng, n_e, aligned); break;
      default: break;
    }
    return;
  }
#endif
#if defined(ST_AVX2) && !defined(ST_VNNI)
  if (a.blocks) {
    for (int64_t b = 0; b < a.B; b += 4) score_blocks(a, w, b, std::min<int64_t>(4, a.B - b), n_e);
    return;
  }
#endif
  // row by row (consecutive rows in one call)
  const bool check = a.M > 1;
  for (int64_t b = 0; b < a.B; ++b) {
    const int8_t* q = a.qc + b * a.D;
    if (contiguous) {
      dots(q, a.codes + rows[0] * a.D, n_e, a.D, w.dot.data());
    } else {
      for (int64_t i = 0; i < n_e; ++i) dots(q, a.codes + rows[i] * a.D, 1, a.D, w.dot.data() + i);
    }
    threshold(a, w, b);
    for (int64_t i = 0; i < n_e; ++i) {
      const float v = (static_cast<float>(w.dot[i]) * a.scale[rows[i]]) * a.qs[b];
      offer(a, w, b, v, rows[i], check);
    }
  }
}

// Work unit u: rows [u * kUnit, (u + 1) * kUnit) below num_valid. The rows eligible for some
// query of the batch (every row without a mask) are collected into tiles of kTile, so a
// selective filter scores full tiles of its eligible rows, and unit parts without one
// cost only their mask words.
void scan_unit(const FlatArgs& a, Worker& w, int64_t u) {
  const int64_t r_end = std::min((u + 1) * kUnit, a.num_valid);
  int64_t n_e = 0;
  for (int64_t r = u * kUnit; r < r_end; r += 32) {
    uint32_t word = ~0u;
    if (a.M == 1) {
      word = a.mask[r >> 5];
    } else if (a.M > 1) {
      word = 0;
      for (int64_t b = 0; b < a.B; ++b) word |= a.mask[b * a.W + (r >> 5)];
    }
    if (r_end - r < 32) word &= (1u << (r_end - r)) - 1;
    for (; word; word &= word - 1) {
      w.rows[n_e++] = static_cast<int32_t>(r + __builtin_ctz(word));
      if (n_e == kTile) {
        score_tile(a, w, n_e);
        n_e = 0;
      }
    }
  }
  if (n_e) score_tile(a, w, n_e);
}

ffi::Error FlatScan(ffi::ThreadPool pool, ffi::Buffer<ffi::S8, 2> qc, ffi::Buffer<ffi::F32, 1> qs,
                    ffi::Buffer<ffi::S8, 2> codes, ffi::Buffer<ffi::F32, 1> scale,
                    ffi::Buffer<ffi::U32, 2> mask, int64_t k, int64_t num_valid,
                    ffi::ResultBuffer<ffi::F32, 2> out_v, ffi::ResultBuffer<ffi::S32, 2> out_r) {
  return guarded("flat_scan", [&]() -> ffi::Error {  // (no exception may leave it)
    const auto qd = qc.dimensions(), cd = codes.dimensions(), md = mask.dimensions(),
               vd = out_v->dimensions();
    const int64_t B = qd[0], D = qd[1], N = cd[0], W = (N + 31) / 32, M = md[0];
    if (cd[1] != D || qs.dimensions()[0] != B || scale.dimensions()[0] != N || md[1] != W ||
        (M != 0 && M != 1 && M != B) || vd[0] != B || vd[1] != k || k < 1 || D < 1)
      return ffi::Error::InvalidArgument("st_jax flat_scan: operand shapes do not agree");
    if (num_valid < 0 || num_valid > N)
      return ffi::Error::InvalidArgument("st_jax flat_scan: num_valid must be in [0, N]");
    if (N > std::numeric_limits<int32_t>::max())
      return ffi::Error::InvalidArgument("st_jax flat_scan: more than 2**31 - 1 rows");
    if (B == 0) return ffi::Error::Success();

    const int64_t nj = (D + 3) / 4;
    std::vector<int32_t> qw(B * nj, 0), qsum(B, 0);
    for (int64_t b = 0; b < B; ++b) {
      const int8_t* q = qc.typed_data() + b * D;
      std::memcpy(qw.data() + b * nj, q, D);  // zero padded to whole 4-byte groups
      for (int64_t j = 0; j < D; ++j) qsum[b] += q[j];
    }
    FlatArgs a{qc.typed_data(), qs.typed_data(), codes.typed_data(), scale.typed_data(),
               mask.typed_data(), B, D, W, M, num_valid,
               std::max<int64_t>(1, std::min<int64_t>(k, num_valid)), nj, qw.data(), qsum.data(),
               nullptr, false, false, nullptr};
    std::unique_ptr<std::atomic<uint32_t>[]> best(new std::atomic<uint32_t>[B]);
    for (int64_t b = 0; b < B; ++b) best[b].store(ordered(kNegInf));
    a.best = best.get();
#ifdef ST_VNNI
    a.interleave = B >= 4;  // fewer queries do not repay the layout change
#elif defined(ST_AVX2)
    a.blocks = B >= 4 && D % 16 == 0;  // (fewer queries: the AVX2 dots row by row)
#endif
    std::vector<int16_t> q16(a.blocks ? B * D : 0);
    for (int64_t i = 0; i < static_cast<int64_t>(q16.size()); ++i) q16[i] = qc.typed_data()[i];
    a.q16 = q16.data();
    const int64_t units = (num_valid + kUnit - 1) / kUnit;
    std::vector<Worker> workers(team_size(pool, units));
    for (Worker& w : workers) {
      w.cand.resize(B);
      for (auto& c : w.cand) c.reserve(std::min<int64_t>(2 * a.kk, 4096));  // fewer regrowths
      w.thr.assign(B, kNegInf);
      w.rows.resize(kTile);
      w.sc.resize(kTile);
      if (a.interleave) w.xt.resize(kTile * nj * 4);
      else w.dot.resize(kTile);
    }
    if (!parallel_for(pool, units, [&](int64_t u, int64_t wi) { scan_unit(a, workers[wi], u); }))
      return out_of_memory("flat_scan");

    // merge the workers' candidates per query
    std::vector<std::vector<uint64_t>> merged(team_size(pool, B));
    float* ov = out_v->typed_data();
    int32_t* orow = out_r->typed_data();
    const bool merged_ok = parallel_for(pool, B, [&](int64_t b, int64_t wi) {
      std::vector<uint64_t>& c = merged[wi];
      c.clear();
      for (const Worker& w : workers) c.insert(c.end(), w.cand[b].begin(), w.cand[b].end());
      const int64_t m = best_sorted(c, a.kk);
      for (int64_t t = 0; t < m; ++t) {
        ov[b * k + t] = score_of(c[t]);
        orow[b * k + t] = reported_row(ov[b * k + t], pos_of(c[t]));
      }
      for (int64_t t = m; t < k; ++t) {
        ov[b * k + t] = kNegInf;
        orow[b * k + t] = -1;
      }
    });
    if (!merged_ok) return out_of_memory("flat_scan");
    return ffi::Error::Success();
  });
}

}  // namespace

using Words2 = ffi::BufferR2<ffi::U32>;

extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* StJaxFlatScan(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(StJaxFlatScan, FlatScan,
                              bind_scan()
                                  .Arg<Words2>()     // mask
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("num_valid")
                                  .Ret<OutV>()
                                  .Ret<OutR>());

// The instruction set of the int8 dots this library was built with (native.isa()).
extern "C" __attribute__((visibility("default"))) const char* StJaxNativeIsa() {
#if defined(ST_VNNI)
  return "avx512-vnni";
#elif defined(ST_AVX2)
  return "avx2";
#else
  return "plain C++";
#endif
}
