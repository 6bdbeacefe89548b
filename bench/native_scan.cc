// bench/native_scan.py's measuring probe: the IVF twin's contract (pallas_kernels/ivf_scan.py)
// as plain C++, to measure what a native CPU kernel (an XLA FFI custom call) would gain over
// the XLA twin. Not part of the library: compiled by the benchmark into a temporary folder.
//
// Per query (OpenMP over queries): every probed block with an eligible item is read in place,
// each eligible row's int8 dot with the int8 query (auto-vectorised) is scaled like the twin's
// (dot * scale[row] * qs[b]), and rows scoring at least the running threshold are buffered;
// a full buffer (2k) is cut to its best k by nth_element and the threshold raised to its k-th
// value. The survivors are sorted by (score desc, probe position asc): the twin's order, ties
// included. Outputs: out_v f32[B, k] (-inf padded), out_r i32[B, k] storage rows (-1 padded).
#include <cstdint>
#include <vector>
#include <algorithm>
#include <cmath>
#include <limits>
extern "C" void ivf_scan(const int8_t* qc, const float* qs, const int8_t* codes,
                         const float* scale, const int32_t* blocks, const uint32_t* pmask,
                         int B, int P, int D, int block, int k, float* out_v, int32_t* out_r) {
  const int wpb = block / 32;
#pragma omp parallel for schedule(dynamic, 1)
  for (int b = 0; b < B; ++b) {
    std::vector<float> cv; std::vector<int64_t> cp; cv.reserve(2 * k + block); cp.reserve(2 * k + block);
    float thr = -std::numeric_limits<float>::infinity();
    const int8_t* q = qc + (int64_t)b * D;
    for (int p = 0; p < P; ++p) {
      const uint32_t* w = pmask + ((int64_t)b * P + p) * wpb;
      bool any = false; for (int j = 0; j < wpb; ++j) any |= w[j] != 0;
      if (!any) continue;
      int64_t r0 = (int64_t)blocks[(int64_t)b * P + p] * block;
      for (int i = 0; i < block; ++i) {
        if (!((w[i >> 5] >> (i & 31)) & 1u)) continue;
        const int8_t* x = codes + (r0 + i) * D;
        int32_t acc = 0;
#pragma omp simd reduction(+:acc)
        for (int d = 0; d < D; ++d) acc += (int32_t)q[d] * (int32_t)x[d];
        float s = (float)acc * scale[r0 + i] * qs[b];
        if (s >= thr) {
          cv.push_back(s); cp.push_back((int64_t)p * block + i);
          if ((int)cv.size() >= 2 * k) {
            std::vector<int> idx(cv.size()); for (size_t t = 0; t < idx.size(); ++t) idx[t] = t;
            std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), [&](int a, int c) {
              return cv[a] > cv[c] || (cv[a] == cv[c] && cp[a] < cp[c]); });
            thr = cv[idx[k - 1]];
            std::vector<float> nv; std::vector<int64_t> np_;
            for (int t = 0; t < k; ++t) { nv.push_back(cv[idx[t]]); np_.push_back(cp[idx[t]]); }
            cv.swap(nv); cp.swap(np_);
          }
        }
      }
    }
    std::vector<int> idx(cv.size()); for (size_t t = 0; t < idx.size(); ++t) idx[t] = t;
    std::sort(idx.begin(), idx.end(), [&](int a, int c) {
      return cv[a] > cv[c] || (cv[a] == cv[c] && cp[a] < cp[c]); });
    for (int t = 0; t < k; ++t) {
      if (t < (int)idx.size()) {
        out_v[(int64_t)b * k + t] = cv[idx[t]];
        int64_t pos = cp[idx[t]];
        out_r[(int64_t)b * k + t] = blocks[(int64_t)b * P + pos / block] * block + pos % block;
      } else { out_v[(int64_t)b * k + t] = -INFINITY; out_r[(int64_t)b * k + t] = -1; }
    }
  }
}
