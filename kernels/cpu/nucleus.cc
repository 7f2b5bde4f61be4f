// The top-p nucleus of the sampler's rows of probabilities, called from numpy through ctypes
// (kernels/cpu_ops.py nucleus_columns): the columns of kernels/nucleus.py nucleus, whose numpy
// calls took about half of the ~4 ms a decode step spent picking 8 tokens.
//
// The same arithmetic as that function, so the same columns: the candidates are the columns whose
// probability is >= each cut in turn (float32 compares), then the whole row; sorted in descending order,
// their running float32 sum c (numpy's cumsum adds in order) gives each candidate's mass above it as
// c_i - top_i, rounded to float32 as numpy subtracts; a candidate set suffices once the last of those
// reaches top_p. The threshold is the least candidate whose mass above is < top_p, and the nucleus every
// column >= threshold, in ascending order.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "common.h"

namespace {

// float -> uint32 whose unsigned order is the float order (negatives included)
inline uint32_t order_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float from_order_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// values in descending order: std::sort for a few, else an LSD radix sort of their order keys (a whole
// row of 49152 took std::sort 2-3 ms; equal values are equal, so any sort gives the same sequence)
void sort_descending(std::vector<float> &values, std::vector<uint32_t> &keys, std::vector<uint32_t> &spare) {
  const size_t n = values.size();
  if (n < 512) {
    std::sort(values.begin(), values.end(), std::greater<float>());
    return;
  }
  keys.resize(n);
  spare.resize(n);
  for (size_t i = 0; i < n; ++i) keys[i] = ~order_key(values[i]);  // ascending ~key: descending values
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  for (int shift = 0; shift < 32; shift += kBits) {
    size_t count[kBuckets + 1] = {0};
    for (size_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & (kBuckets - 1)) + 1];
    for (int b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (size_t i = 0; i < n; ++i) spare[count[(keys[i] >> shift) & (kBuckets - 1)]++] = keys[i];
    keys.swap(spare);
  }
  for (size_t i = 0; i < n; ++i) values[i] = from_order_key(~keys[i]);
}

// the values >= floor (every value with floor -inf) into top; their float64 sum and least value
void collect(const float *p, int64_t V, float floor, std::vector<float> &top, double &sum, float &least) {
  top.clear();
  sum = 0.0;
  least = INFINITY;
  for (int64_t j = 0; j < V; ++j)
    if (p[j] >= floor) {
      top.push_back(p[j]);
      sum += p[j];
      least = std::min(least, p[j]);
    }
}

// sort top in descending order and scan it as numpy does: the least value whose mass above (float32
// running sum minus itself) is < top_p (INFINITY for none), and that mass for the last value
void scan(std::vector<float> &top, float top_p, std::vector<uint32_t> &keys, std::vector<uint32_t> &spare,
          float &threshold, float &last_before) {
  sort_descending(top, keys, spare);
  float sum = 0.0f;
  threshold = INFINITY;
  last_before = 0.0f;
  for (const float t : top) {
    sum += t;
    const float before = sum - t;
    if (before < top_p) threshold = std::min(threshold, t);
    last_before = before;
  }
}

// the floors the whole-row step tries before a sort of the whole row (below every cut a caller gives)
constexpr float kRowFloors[] = {1e-6f, 1e-7f, 1e-8f, 1e-10f};

// row's nucleus into cols (ascending); its size, or -1 if the row holds a NaN
int64_t row_nucleus(const float *p, int64_t V, float top_p, const float *cuts, int64_t n_cuts, int32_t *cols,
                    std::vector<float> &top, std::vector<uint32_t> &keys, std::vector<uint32_t> &spare) {
  for (int64_t j = 0; j < V; ++j)
    if (std::isnan(p[j])) return -1;
  double sum;
  float least, threshold = INFINITY, last_before;
  // A float32 running sum of n values of total S is within n 2^-24 S of S; with this margin a float64 sum
  // tells, without sorting, where the sorted float32 sums fall short of top_p or pass it
  auto margin = [&](double s) { return static_cast<double>(top.size()) * 0x1p-23 * std::max(s, 1.0) + 0x1p-19; };
  bool done = false;
  for (int64_t c = 0; c < n_cuts && !done; ++c) {
    collect(p, V, cuts[c], top, sum, least);
    // numpy's test (the mass above the least candidate reaches top_p) surely fails: skip the sort
    if (top.empty() || sum - least + margin(sum) < top_p) continue;
    scan(top, top_p, keys, spare, threshold, last_before);
    done = last_before >= top_p;
  }
  // The whole row, which numpy sorts. Where the running sum passes top_p by more than 2^-20 at some value,
  // every later value's mass above stays >= top_p (each running sum rounds down by at most an ulp), so
  // it cannot move the threshold: a floor whose values' sum passes top_p by the margin gives the row's.
  for (size_t f = 0; f < sizeof(kRowFloors) / sizeof(float) && !done; ++f) {
    if (n_cuts && kRowFloors[f] >= cuts[n_cuts - 1]) continue;
    collect(p, V, kRowFloors[f], top, sum, least);
    if (sum - margin(sum) <= static_cast<double>(top_p) + 0x1p-20) continue;
    scan(top, top_p, keys, spare, threshold, last_before);
    done = true;
  }
  if (!done) {
    collect(p, V, -INFINITY, top, sum, least);
    scan(top, top_p, keys, spare, threshold, last_before);
  }
  int64_t k = 0;  // threshold <= the top value: before_0 = 0 < top_p
  for (int64_t j = 0; j < V; ++j)
    if (p[j] >= threshold) cols[k++] = static_cast<int32_t>(j);
  return k;
}

}  // namespace

extern "C" {

// probs float32 [B, V]; cuts float32 [n_cuts], tried in turn before the whole row; row b's nucleus goes to
// cols[b * V, b * V + counts[b]). Returns 0, or 1 + b for the first row b that holds a NaN.
int MsDfkdNucleus(const float *probs, int64_t B, int64_t V, float top_p, const float *cuts, int64_t n_cuts,
                  int32_t *cols, int64_t *counts) {
  // a thread is worth it from about two rows of a 49152-token vocabulary
  msdfkd::parallel_for(B, std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)),
                       [=](int, int64_t begin, int64_t end) {
                         std::vector<float> top;
                         std::vector<uint32_t> keys, spare;
                         for (int64_t b = begin; b < end; ++b)
                           counts[b] = row_nucleus(probs + b * V, V, top_p, cuts, n_cuts, cols + b * V, top, keys,
                                                   spare);
                       });
  for (int64_t b = 0; b < B; ++b)
    if (counts[b] < 0) return static_cast<int>(1 + b);
  return 0;
}

}  // extern "C"
