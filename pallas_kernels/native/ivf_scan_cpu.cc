// Native CPU IVF scan: pallas_kernels.ivf_scan's contract as an XLA FFI handler.
//
// The Pallas kernel runs on GPU and the XLA twin (ivf_topk_reference) is the reference;
// this is the CPU kernel `backend="auto"` uses when it could be built (pallas_kernels/native.py
// compiles it on first use). It returns exactly what the twin returns: the same scores
// ((float(dot) * scale[row]) * qs[b], the twin's order of float operations), the same rows and
// the same order among equal scores (probe position: slot p of the query's block list, then
// the item in the block).
//
// Inputs: qc s8[B, D] quantised queries, qs f32[B] their scales, codes s8[n_rows, D],
// scale f32[n_rows], blocks s32[B, P] probed blocks, pmask u32[B, P, block / 32] their
// eligibility words. Attributes: k, block. Outputs: f32[B, k] scores (-inf padded),
// s32[B, k] storage rows (-1 padded).
//
// Per query (queries spread over XLA's intra-op thread pool): every probed block with an
// eligible item is read in place (only its eligible rows when under a quarter of them are);
// its rows' int8 dots (AVX-512 VNNI where the CPU has it, else AVX2 vpmaddwd on bytes
// sign-extended to int16, else a plain loop; all exact) are scaled, and the eligible rows
// scoring at least the query's running threshold are kept in a
// buffer of integer keys (score bits, then probe position); a full buffer (2 kk) is cut to
// its best kk by nth_element and the threshold raised to its kk-th score. No temporary the
// size of the probe is written.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.h"

namespace {

using namespace st_native;

struct Args {
  const int8_t* qc;
  const float* qs;
  const int8_t* codes;
  const float* scale;
  const int32_t* blocks;
  const uint32_t* pmask;
  int64_t P, D, block, k, kk, n_blocks;
  float* out_v;
  int32_t* out_r;
};

// One query; false when a live probed block id is out of range.
bool scan_query(const Args& a, int64_t b, std::vector<uint64_t>& cand, std::vector<int32_t>& dot,
                std::vector<float>& score) {
  const int64_t wpb = a.block / 32, kk = a.kk;
  const int8_t* q = a.qc + b * a.D;
  const float qs = a.qs[b];
  float thr = kNegInf;
  cand.clear();
  for (int64_t p = 0; p < a.P; ++p) {
    const uint32_t* w = a.pmask + (b * a.P + p) * wpb;
    bool live = false;
    for (int64_t j = 0; j < wpb; ++j) live |= w[j] != 0;
    if (!live) continue;
    const int64_t blk = a.blocks[b * a.P + p];
    if (blk < 0 || blk >= a.n_blocks) return false;
    const int64_t r0 = blk * a.block;
    const float* sc = a.scale + r0;
    int64_t eligible = 0;
    for (int64_t j = 0; j < wpb; ++j) eligible += __builtin_popcount(w[j]);
    if (4 * eligible < a.block) {
      // a selective filter: read and score the eligible rows only
      for (int64_t j = 0; j < wpb; ++j) {
        for (uint32_t bits = w[j]; bits; bits &= bits - 1) {
          const int64_t i = 32 * j + __builtin_ctz(bits);
          dots(q, a.codes + (r0 + i) * a.D, 1, a.D, dot.data() + i);
          score[i] = (static_cast<float>(dot[i]) * sc[i]) * qs;
        }
      }
    } else {
      dots(q, a.codes + r0 * a.D, a.block, a.D, dot.data());
      for (int64_t i = 0; i < a.block; ++i) score[i] = (static_cast<float>(dot[i]) * sc[i]) * qs;
    }
    for (int64_t j = 0; j < wpb; ++j) {
      uint32_t hit = 0;
      const float* s32 = score.data() + 32 * j;
      for (int t = 0; t < 32; ++t) hit |= static_cast<uint32_t>(s32[t] >= thr) << t;
      hit &= w[j];  // (scores of ineligible rows may be stale: masked here)
      while (hit) {
        const int t = __builtin_ctz(hit);
        hit &= hit - 1;
        const float v = s32[t];
        if (v < thr) continue;  // thr rose within this word
        cand.push_back(key_of(v, static_cast<uint32_t>(p * a.block + 32 * j + t)));
        if (static_cast<int64_t>(cand.size()) >= 2 * kk) thr = cut_to_best(cand, kk);
      }
    }
  }
  const int64_t m = best_sorted(cand, kk);
  float* ov = a.out_v + b * a.k;
  int32_t* orow = a.out_r + b * a.k;
  for (int64_t t = 0; t < m; ++t) {
    ov[t] = score_of(cand[t]);
    const int64_t pos = static_cast<uint32_t>(cand[t]);
    orow[t] = reported_row(ov[t], a.blocks[b * a.P + pos / a.block] * a.block + pos % a.block);
  }
  for (int64_t t = m; t < a.k; ++t) {
    ov[t] = kNegInf;
    orow[t] = -1;
  }
  return true;
}

ffi::Error IvfScan(ffi::ThreadPool pool, ffi::Buffer<ffi::S8, 2> qc, ffi::Buffer<ffi::F32, 1> qs,
                   ffi::Buffer<ffi::S8, 2> codes, ffi::Buffer<ffi::F32, 1> scale,
                   ffi::Buffer<ffi::S32, 2> blocks, ffi::Buffer<ffi::U32, 3> pmask, int64_t k,
                   int64_t block, ffi::ResultBuffer<ffi::F32, 2> out_v,
                   ffi::ResultBuffer<ffi::S32, 2> out_r) {
  return guarded("ivf_scan", [&]() -> ffi::Error {  // (no exception may leave it)
    const auto qd = qc.dimensions(), cd = codes.dimensions(), bd = blocks.dimensions(),
               md = pmask.dimensions(), vd = out_v->dimensions();
    const int64_t B = qd[0], D = qd[1], n_rows = cd[0], P = bd[1];
    if (block <= 0 || block % 32 || n_rows % block)
      return ffi::Error::InvalidArgument("st_jax ivf_scan: block must be a positive multiple "
                                         "of 32 dividing n_rows");
    if (cd[1] != D || qs.dimensions()[0] != B || scale.dimensions()[0] != n_rows ||
        bd[0] != B || md[0] != B || md[1] != P || md[2] != block / 32 || vd[0] != B ||
        vd[1] != k || k < 1)
      return ffi::Error::InvalidArgument("st_jax ivf_scan: operand shapes do not agree");
    if (P * block > std::numeric_limits<int32_t>::max())
      return ffi::Error::InvalidArgument("st_jax ivf_scan: probe too large");
    const Args args{qc.typed_data(), qs.typed_data(), codes.typed_data(), scale.typed_data(),
                    blocks.typed_data(), pmask.typed_data(), P, D, block, k,
                    std::min<int64_t>(k, P * block), n_rows / block, out_v->typed_data(),
                    out_r->typed_data()};
    std::atomic<bool> bad{false};
    struct Scratch {
      std::vector<uint64_t> cand;
      std::vector<int32_t> dot;
      std::vector<float> score;
    };
    std::vector<Scratch> scratch(team_size(pool, B));
    const bool ok = parallel_for(pool, B, [&](int64_t b, int64_t w) {
      Scratch& s = scratch[w];
      if (s.cand.capacity() == 0) {
        s.cand.reserve(2 * args.kk + 1);
        s.dot.resize(block);
        s.score.resize(block);
      }
      if (!scan_query(args, b, s.cand, s.dot, s.score)) bad.store(true);
    });
    if (!ok) return out_of_memory("ivf_scan");
    if (bad.load())
      return ffi::Error::InvalidArgument("st_jax ivf_scan: a probed block with eligible items "
                                         "is out of range [0, n_rows / block)");
    return ffi::Error::Success();
  });
}

}  // namespace

using Blocks = ffi::BufferR2<ffi::S32>;
using Words = ffi::BufferR3<ffi::U32>;

// the handler symbol native.py loads (the library is built with -fvisibility=hidden)
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* StJaxIvfScan(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(StJaxIvfScan, IvfScan,
                              bind_scan()
                                  .Arg<Blocks>()     // blocks
                                  .Arg<Words>()      // pmask
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("block")
                                  .Ret<OutV>()
                                  .Ret<OutR>());
