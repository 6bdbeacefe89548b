// Native CPU filter mask: st_jax._filter_index.filter_mask's contract as an XLA FFI handler.
//
// The XLA path (interval bounds by pallas_kernels.filter_eval's twin, then the exact
// verification of the uncertain items in a lax.while_loop) is the reference; on CPU it is a
// large graph (each instance ~2,000 HLO lines: a filtered IVF search holds four) that XLA
// compiles for seconds. This handler computes the same exact mask in one custom call.
//
// Inputs: rows u32[R, W] bit-sliced rows (row 1 = VALID), item_offsets s32[32 W + 1] and
// item_terms s32[nnz] (each item's sorted Bloom term ids, CSR), ops s32[Bp, P],
// rowids s32[Bp, P, KP], terms s32[Bp, P], lengths s32[Bp] (compiled programs, see
// st_jax._filter_lang), word_ids s32[Bw, NW] (ignored when `dense`). Attributes: num_hashes,
// stack_depth, dense, and the XLA path's max_bloom and verify_capacity (not needed here).
// Output: u32[Bp, W] (dense: every word) or u32[Bo, NW], Bo = max(Bp, Bw) (a program or a
// word list of batch 1 is shared); bit t of a word is 1 iff item 32 w + t is valid and
// satisfies its program; out-of-range word ids give 0.
//
// Per (output row, chunk of words): the program runs once over the chunk on interval masks
// (lower, upper), an instruction at a time over all the chunk's words (op codes as in
// pallas_kernels/filter_eval.py: exact term (rows, rows), Bloom term (0, AND of its rows), AND
// / OR componentwise, NOT (~upper, ~lower)); then each word with uncertain bits
// (upper & ~lower) runs the program again exactly on its 32 items: exact terms read their
// row's bit, Bloom terms look the term up in the item's sorted list (binary search) for the
// uncertain items only. Result: lower | (exact & uncertain), the same bits the XLA path gives.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

using namespace st_native;

constexpr int32_t kNop = 0, kExact = 1, kBloom = 2, kAnd = 3, kOr = 4, kNot = 5;
constexpr int64_t kValidRow = 1;
constexpr int64_t kChunk = 512;  // words per unit of work

struct MaskArgs {
  const uint32_t* rows;
  const int32_t* offsets;
  const int32_t* item_terms;
  const int32_t* ops;
  const int32_t* rowids;
  const int32_t* terms;
  const int32_t* lengths;
  const int32_t* word_ids;
  int64_t R, W, nnz, Bp, P, KP, Bw, NW, num_hashes, S;
  bool dense;
  uint32_t* out;
  int64_t out_words;  // words per output row
};

struct Scratch {
  std::vector<uint32_t> lo, up;  // [S][kChunk] interval stack
  std::vector<int64_t> wid;      // [kChunk] word index (clamped)
  std::vector<uint32_t> in_range;  // [kChunk] all-ones for an in-range word id, else 0
  std::vector<uint32_t> exact;   // [S] exact stack of one word
};

inline bool is_term(int32_t op) { return op == kExact || op == kBloom; }

inline int64_t clamp_slot(int64_t i, int64_t S) { return std::clamp<int64_t>(i, 0, S - 1); }

// Does item `item` hold Bloom term `term`? (binary search in its sorted CSR list)
inline bool has_term(const MaskArgs& a, int64_t item, int32_t term) {
  int64_t beg = std::clamp<int64_t>(a.offsets[item], 0, a.nnz);
  int64_t end = std::clamp<int64_t>(a.offsets[item + 1], 0, a.nnz);
  if (end <= beg) return false;
  const int32_t* first = a.item_terms + beg;
  const int32_t* last = a.item_terms + end;
  const int32_t* it = std::lower_bound(first, last, term);
  return it != last && *it == term;
}

// The exact program value of the uncertain items `unc` of word `w` (other bits unspecified).
uint32_t exact_word(const MaskArgs& a, const int32_t* ops, const int32_t* rid,
                    const int32_t* terms, int64_t n, int64_t w, uint32_t unc,
                    uint32_t* stack) {
  const int64_t S = a.S;
  std::fill(stack, stack + S, 0u);
  int64_t sp = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int32_t op = ops[p];
    if (is_term(op)) {
      uint32_t v = 0;
      if (op == kExact) {
        v = a.rows[rid[p * a.KP] * a.W + w];
      } else {
        for (uint32_t bits = unc; bits; bits &= bits - 1) {
          const int t = __builtin_ctz(bits);
          if (has_term(a, 32 * w + t, terms[p])) v |= 1u << t;
        }
      }
      if (sp >= 0 && sp < S) stack[sp] = v;
      ++sp;
    } else if (op == kAnd || op == kOr) {
      const uint32_t x = stack[clamp_slot(sp - 1, S)], y = stack[clamp_slot(sp - 2, S)];
      const int64_t dst = sp - 2;
      if (dst >= 0 && dst < S) stack[dst] = op == kAnd ? (x & y) : (x | y);
      --sp;
    } else if (op == kNot) {
      const uint32_t x = stack[clamp_slot(sp - 1, S)];
      const int64_t dst = sp - 1;
      if (dst >= 0 && dst < S) stack[dst] = ~x;
    }
  }
  return stack[0];
}

// One output row `b`, words [j0, j0 + m) of its word list.
void mask_chunk(const MaskArgs& a, Scratch& s, int64_t b, int64_t j0, int64_t m) {
  const int64_t pb = a.Bp == 1 ? 0 : b;
  const int32_t* ops = a.ops + pb * a.P;
  const int32_t* rid = a.rowids + pb * a.P * a.KP;
  const int32_t* terms = a.terms + pb * a.P;
  const int64_t n = std::clamp<int64_t>(a.lengths[pb], 0, a.P);
  const int64_t S = a.S, W = a.W;
  int64_t* wid = s.wid.data();
  uint32_t* in_range = s.in_range.data();
  if (a.dense) {
    for (int64_t c = 0; c < m; ++c) {
      wid[c] = j0 + c;
      in_range[c] = ~0u;
    }
  } else {
    const int32_t* ids = a.word_ids + (a.Bw == 1 ? 0 : b) * a.NW + j0;
    for (int64_t c = 0; c < m; ++c) {
      const bool ok = ids[c] >= 0 && ids[c] < W;
      wid[c] = ok ? ids[c] : 0;
      in_range[c] = ok ? ~0u : 0u;
    }
  }
  // a row's words for this chunk: contiguous (dense) or gathered
  auto load_and = [&](uint32_t* dst, int64_t row, bool first) {
    const uint32_t* r = a.rows + row * W;
    if (a.dense) {
      const uint32_t* src = r + j0;
      if (first)
        std::copy(src, src + m, dst);
      else
        for (int64_t c = 0; c < m; ++c) dst[c] &= src[c];
    } else if (first) {
      for (int64_t c = 0; c < m; ++c) dst[c] = r[wid[c]];
    } else {
      for (int64_t c = 0; c < m; ++c) dst[c] &= r[wid[c]];
    }
  };
  uint32_t* lo = s.lo.data();
  uint32_t* up = s.up.data();
  std::fill(s.lo.begin(), s.lo.end(), 0u);  // the stack starts all zero, as in the twin
  std::fill(s.up.begin(), s.up.end(), 0u);
  int64_t sp = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int32_t op = ops[p];
    if (is_term(op)) {
      if (sp >= 0 && sp < S) {
        uint32_t* u = up + sp * kChunk;
        const int32_t* r = rid + p * a.KP;
        for (int64_t h = 0; h < a.num_hashes; ++h) load_and(u, r[h], h == 0);
        uint32_t* l = lo + sp * kChunk;
        if (op == kExact)
          std::copy(u, u + m, l);
        else
          std::fill(l, l + m, 0u);
      }
      ++sp;
    } else if (op == kAnd || op == kOr) {
      const int64_t i1 = clamp_slot(sp - 1, S), i2 = clamp_slot(sp - 2, S), dst = sp - 2;
      if (dst >= 0 && dst < S) {
        const uint32_t *l1 = lo + i1 * kChunk, *l2 = lo + i2 * kChunk;
        const uint32_t *u1 = up + i1 * kChunk, *u2 = up + i2 * kChunk;
        uint32_t *ld = lo + dst * kChunk, *ud = up + dst * kChunk;
        if (op == kAnd) {
          for (int64_t c = 0; c < m; ++c) {
            ld[c] = l1[c] & l2[c];
            ud[c] = u1[c] & u2[c];
          }
        } else {
          for (int64_t c = 0; c < m; ++c) {
            ld[c] = l1[c] | l2[c];
            ud[c] = u1[c] | u2[c];
          }
        }
      }
      --sp;
    } else if (op == kNot) {
      const int64_t i1 = clamp_slot(sp - 1, S), dst = sp - 1;
      if (dst >= 0 && dst < S) {
        uint32_t *l = lo + i1 * kChunk, *u = up + i1 * kChunk;
        uint32_t *ld = lo + dst * kChunk, *ud = up + dst * kChunk;
        for (int64_t c = 0; c < m; ++c) {
          const uint32_t nl = ~u[c], nu = ~l[c];
          ld[c] = nl;
          ud[c] = nu;
        }
      }
    }
  }
  const uint32_t* valid = a.rows + kValidRow * W;
  uint32_t* out = a.out + b * a.out_words + j0;
  for (int64_t c = 0; c < m; ++c) {
    const uint32_t v = valid[wid[c]] & in_range[c];
    const uint32_t l = lo[c] & v, unc = up[c] & v & ~l;
    out[c] = unc ? l | (exact_word(a, ops, rid, terms, n, wid[c], unc, s.exact.data()) & unc)
                 : l;
  }
}

ffi::Error FilterMask(ffi::ThreadPool pool, ffi::Buffer<ffi::U32, 2> rows,
                      ffi::Buffer<ffi::S32, 1> offsets, ffi::Buffer<ffi::S32, 1> item_terms,
                      ffi::Buffer<ffi::S32, 2> ops, ffi::Buffer<ffi::S32, 3> rowids,
                      ffi::Buffer<ffi::S32, 2> terms, ffi::Buffer<ffi::S32, 1> lengths,
                      ffi::Buffer<ffi::S32, 2> word_ids, int64_t num_hashes, int64_t stack_depth,
                      int64_t dense, int64_t max_bloom, int64_t verify_capacity,
                      ffi::ResultBuffer<ffi::U32, 2> out) {
  (void)max_bloom;
  (void)verify_capacity;
  return guarded("filter_mask", [&]() -> ffi::Error {  // (no exception may leave it)
    const auto rd = rows.dimensions(), od = ops.dimensions(), id = rowids.dimensions(),
               wd = word_ids.dimensions(), outd = out->dimensions();
    const int64_t R = rd[0], W = rd[1], Bp = od[0], P = od[1], KP = id[2];
    const int64_t Bw = dense ? Bp : wd[0], NW = dense ? W : wd[1];
    const int64_t Bo = std::max(Bp, Bw);
    auto bad = [](const char* what) {
      return ffi::Error::InvalidArgument(std::string("st_jax filter_mask: ") + what);
    };
    if (R < 2) return bad("the index needs its ZERO and VALID rows (R >= 2)");
    if (id[0] != Bp || id[1] != P || terms.dimensions()[0] != Bp ||
        terms.dimensions()[1] != P || lengths.dimensions()[0] != Bp)
      return bad("ops, rowids, terms and lengths disagree on the program batch / length");
    if (num_hashes < 1 || num_hashes > KP) return bad("num_hashes must be in [1, KP]");
    if (stack_depth < 1 || stack_depth > (1 << 16)) return bad("stack_depth must be in [1, 65536]");
    if (offsets.dimensions()[0] != 32 * W + 1)
      return bad("item_offsets must have 32 W + 1 entries");
    if ((Bp != Bo && Bp != 1) || (Bw != Bo && Bw != 1))
      return bad("programs and word lists: equal batches or one of them 1");
    if (outd[0] != Bo || outd[1] != NW) return bad("output shape does not agree");
    if (W == 0) {  // no items: nothing to load (out-of-range word ids give 0 anyway)
      std::fill(out->typed_data(), out->typed_data() + Bo * NW, 0u);
      return ffi::Error::Success();
    }
    const int32_t* o = ops.typed_data();
    const int32_t* r = rowids.typed_data();
    const int32_t* len = lengths.typed_data();
    for (int64_t b = 0; b < Bp; ++b) {
      const int64_t n = std::clamp<int64_t>(len[b], 0, P);
      for (int64_t p = 0; p < n; ++p) {
        if (!is_term(o[b * P + p])) continue;
        for (int64_t h = 0; h < num_hashes; ++h) {
          const int32_t row = r[(b * P + p) * KP + h];
          if (row < 0 || row >= R) return bad("a program reads a row out of range [0, R)");
        }
      }
    }
    const MaskArgs a{rows.typed_data(), offsets.typed_data(), item_terms.typed_data(), o, r,
                     terms.typed_data(), len, word_ids.typed_data(), R, W,
                     static_cast<int64_t>(item_terms.element_count()), Bp, P, KP, Bw, NW,
                     num_hashes, stack_depth, dense != 0, out->typed_data(), NW};
    const int64_t chunks = (NW + kChunk - 1) / kChunk;
    std::vector<Scratch> scratch(team_size(pool, Bo * chunks));
    const bool ok = parallel_for(pool, Bo * chunks, [&](int64_t u, int64_t w) {
      Scratch& s = scratch[w];
      if (s.lo.empty()) {
        s.lo.resize(stack_depth * kChunk);
        s.up.resize(stack_depth * kChunk);
        s.wid.resize(kChunk);
        s.in_range.resize(kChunk);
        s.exact.resize(stack_depth);
      }
      const int64_t b = u / chunks, j0 = (u % chunks) * kChunk;
      mask_chunk(a, s, b, j0, std::min<int64_t>(kChunk, NW - j0));
    });
    if (!ok) return out_of_memory("filter_mask");
    return ffi::Error::Success();
  });
}

}  // namespace

// the handler symbol native.py loads (the library is built with -fvisibility=hidden)
extern "C" __attribute__((visibility("default"))) XLA_FFI_Error* StJaxFilterMask(
    XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(StJaxFilterMask, FilterMask,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::BufferR2<ffi::U32>>()   // rows
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // item_offsets
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // item_terms
                                  .Arg<ffi::BufferR2<ffi::S32>>()   // ops
                                  .Arg<ffi::BufferR3<ffi::S32>>()   // rowids
                                  .Arg<ffi::BufferR2<ffi::S32>>()   // terms
                                  .Arg<ffi::BufferR1<ffi::S32>>()   // lengths
                                  .Arg<ffi::BufferR2<ffi::S32>>()   // word_ids
                                  .Attr<int64_t>("num_hashes")
                                  .Attr<int64_t>("stack_depth")
                                  .Attr<int64_t>("dense")
                                  .Attr<int64_t>("max_bloom")
                                  .Attr<int64_t>("verify_capacity")
                                  .Ret<ffi::BufferR2<ffi::U32>>());
