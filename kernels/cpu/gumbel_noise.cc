// The Gumbel noise of kernels/gumbel_noise.py for a block of rows and columns, as one MindSpore `aot` op
// (kernels/cpu_ops.py, ``gumbel_noise``): g[r, c] = -log(-log u), u = ((h >> 9) + 0.5) / 2^23 clamped to
// float32(1 - 1e-6), h = mix32(key[r] ^ col_hash[c]); the logs in float64 and g rounded to float32, as the
// MindSpore composite (kernels.utils.gumbel) computes it.
//
// Why: the composite's hash and two float64 logs over a generator step's [192, 49152] slab took 250-390 ms
// of MindSpore ops. Here the logs are a branch-free float64 log that GCC vectorises (AVX2 where the CPU has
// it, chosen at load time), within an ulp or two of libm's in float64, so g rounds to the same float32
// but for a near-tie about once in 10^8 values (one float32 ulp then). A 2^23-entry table of g was tried:
// its random loads made it memory-latency bound (90-115 ms, huge pages or not).
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

inline uint32_t mix32(uint32_t x) {
  constexpr uint32_t kMix = 0x45D9F3Bu;
  x ^= x >> 16;
  x *= kMix;
  x ^= x >> 16;
  x *= kMix;
  return x ^ (x >> 16);
}

inline double as_double(uint64_t bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

inline uint64_t as_bits(double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return bits;
}

// ln(x) for a positive normal double: x = 2^e m, m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(f), f = (m-1)/(m+1),
// |f| < 0.172, by its series to f^25 (the next term is below 2^-60 of the sum); e ln2 split in two parts
inline double log_positive(double x) {
  const uint64_t bits = as_bits(x);
  const uint64_t mantissa = (bits & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;  // m in [1, 2)
  // the biased exponent as a double, without an int64 -> double conversion (none in AVX2)
  double e = as_double(0x4330000000000000ULL | (bits >> 52)) - (4503599627370496.0 + 1023.0);
  double m = as_double(mantissa);
  const bool high = m > 1.4142135623730951;
  m = high ? m * 0.5 : m;
  e = high ? e + 1.0 : e;
  const double f = (m - 1.0) / (m + 1.0), f2 = f * f;
  double p = 1.0 / 25;
  p = p * f2 + 1.0 / 23;
  p = p * f2 + 1.0 / 21;
  p = p * f2 + 1.0 / 19;
  p = p * f2 + 1.0 / 17;
  p = p * f2 + 1.0 / 15;
  p = p * f2 + 1.0 / 13;
  p = p * f2 + 1.0 / 11;
  p = p * f2 + 1.0 / 9;
  p = p * f2 + 1.0 / 7;
  p = p * f2 + 1.0 / 5;
  p = p * f2 + 1.0 / 3;
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  return e * kLn2Hi + (2.0 * f + (2.0 * f * f2 * p + e * kLn2Lo));
}

__attribute__((target_clones("avx2", "default")))
void noise_row(uint32_t key, const uint32_t *__restrict col_hash, float *__restrict out, int64_t cols) {
  const double u_max = static_cast<double>(static_cast<float>(1.0 - 1e-6));
  for (int64_t c = 0; c < cols; ++c) {
    const uint32_t h = mix32(key ^ col_hash[c]);
    double u = (static_cast<double>(static_cast<int32_t>(h >> 9)) + 0.5) * 0x1p-23;
    u = u < u_max ? u : u_max;
    out[c] = static_cast<float>(-log_positive(-log_positive(u)));
  }
}

}  // namespace

extern "C" {

// params: keys [R] uint32 (the rows' hashes, kernels.utils.row_keys), col_hash [C] uint32 (mix32 of each
//         column); output g [R, C] float32
int MsDfkdGumbelNoise(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 3 || ndims[0] != 1 || ndims[1] != 1) return 1;
  const uint32_t *keys = static_cast<const uint32_t *>(params[0]);
  const uint32_t *col_hash = static_cast<const uint32_t *>(params[1]);
  float *g = static_cast<float *>(params[2]);
  const int64_t rows = shapes[0][0], cols = shapes[1][0];
  msdfkd::parallel_for(rows, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(cols, 1)),
                       [&](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) noise_row(keys[r], col_hash, g + r * cols, cols);
  });
  return 0;
}

}  // extern "C"
