// Products with weights read from a GGUF file's quantised blocks as they are (Q4_1, Q8_0): the LM head
// of the sampler's decode steps (gguf_linear.cc) and the frozen layers' matrices in its decoder layer
// (llama_decode.cc).
//
// Why: a decode step multiplies 8 rows by every weight of the model. SmolLM2's float32 weights are 538
// MB a step; its blocks 96 MB. Each block is expanded once, in registers, and used by every row.
//
// Exactness: a Q4_1 weight is d*q + m (d, m float16, q in 0..15), a Q8_0 weight d*q (q int8), each in
// float32 as gguf's numpy dequantiser computes it. d*q is exact in float32 (11 x 8 significant bits at
// most), so d*q + m rounds once, fused or not: the weights are gguf's to the bit, and so the float32
// weights the model loaded from the same file. Only the order of the sums differs.
//
// Layout (ggml): Q4_1 = d, m, 16 bytes (weight j: the low nibble of byte j, weight 16 + j: its high
// nibble); Q8_0 = d, 32 int8. A row of K weights is K / 32 blocks; a matrix is uint8 [N, K / 32, 20 or
// 34], so the bytes per block say the type (and the interleaved layout below, 192 or 288).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace msdfkd {

constexpr int64_t kQ41Bytes = 20, kQ80Bytes = 34, kBlockValues = 32;

// The interleaved layout: the blocks of 8 consecutive weight rows side by side, repacked once on the host
// (kernels/gguf_blocks_reference.py interleave), so that one AVX2 vector holds one weight of 8 output
// columns. The AVX2 products then broadcast x, keep one accumulator a row of x and need no horizontal sums:
// about 1.3x the ggml layout's loops at 8 rows (that layout's 4 dependent multiply-adds a block and row
// left the multiply-add units half idle). A matrix is uint8 [N / 8, K / 32, 192 or 288]:
//   Q4_1 x8: float32 d[8], float32 m[8], then 16 x 8 bytes, byte (j, c) = q_c[j] | q_c[16 + j] << 4
//   Q8_0 x8: float32 d[8], then 32 x 8 int8, (j, c) = q_c[j]
// The scales are gguf's float16 values in float32 (exact), so the weights are the same to the bit.
constexpr int64_t kQ41x8Bytes = 192, kQ80x8Bytes = 288, kX8Columns = 8;

// weight rows (output columns) a block of this many bytes covers: 8 interleaved, else 1
constexpr int64_t block_columns(int64_t block_bytes) {
  return block_bytes == kQ41x8Bytes || block_bytes == kQ80x8Bytes ? kX8Columns : 1;
}

// IEEE half to float, exact (subnormals included)
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: shift the mantissa up to a normal float
    int shift = -1;
    do {
      man <<= 1;
      ++shift;
    } while (!(man & 0x400u));
    bits = sign | static_cast<uint32_t>(112 - shift) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t *p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

template <int64_t BlockBytes>
inline void dequantize_block(const uint8_t *blk, float *w) {
  const float d = half_to_float(load_u16(blk));
  if constexpr (BlockBytes == kQ41Bytes) {
    const float m = half_to_float(load_u16(blk + 2));
    for (int j = 0; j < 16; ++j) {
      w[j] = d * static_cast<float>(blk[4 + j] & 0x0f) + m;
      w[16 + j] = d * static_cast<float>(blk[4 + j] >> 4) + m;
    }
  } else {
    for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(blk[2 + j]));
  }
}

// any CPU: columns [n0, n1) of y [M, ldy] = x [M, K] W^T, one block at a time; expand(n, b, wb) writes block b
// of weight row n as 32 float32 weights
template <class Expand>
void gguf_rows_portable_by(const float *x, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0, int64_t n1,
                           Expand expand) {
  const int64_t nb = K / kBlockValues;
  float wb[kBlockValues];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      expand(n, b, wb);
      for (int64_t m = 0; m < M; ++m) {
        const float *xr = x + m * K + b * kBlockValues;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < kBlockValues; ++j) s += xr[j] * wb[j];
        y[m * ldy + n] += s;
      }
    }
  }
}

template <int64_t BlockBytes>
void gguf_rows_portable(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                        int64_t n1) {
  const int64_t nb = K / kBlockValues;
  gguf_rows_portable_by(x, y, ldy, M, K, n0, n1, [&](int64_t n, int64_t b, float *wb) {
    dequantize_block<BlockBytes>(w + (n * nb + b) * BlockBytes, wb);
  });
}

// column c of an interleaved group's block, as 32 float32 weights
template <int64_t GroupBytes>
inline void dequantize_x8_column(const uint8_t *grp, int c, float *w) {
  float d;
  std::memcpy(&d, grp + 4 * c, 4);
  if constexpr (GroupBytes == kQ41x8Bytes) {
    float m;
    std::memcpy(&m, grp + 32 + 4 * c, 4);
    for (int j = 0; j < 16; ++j) {
      const uint8_t q = grp[64 + 8 * j + c];
      w[j] = d * static_cast<float>(q & 0x0f) + m;
      w[16 + j] = d * static_cast<float>(q >> 4) + m;
    }
  } else {
    for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(grp[32 + 8 * j + c]));
  }
}

// any CPU, interleaved layout: columns [n0, n1) of y [M, ldy] = x [M, K] W^T
template <int64_t GroupBytes>
void gguf_rows_x8_portable(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                           int64_t n1) {
  const int64_t nb = K / kBlockValues;
  gguf_rows_portable_by(x, y, ldy, M, K, n0, n1, [&](int64_t n, int64_t b, float *wb) {
    dequantize_x8_column<GroupBytes>(w + ((n / kX8Columns) * nb + b) * GroupBytes, static_cast<int>(n % kX8Columns),
                                     wb);
  });
}

// rows of x in groups of 8, each group reading the weights again: kernel(std::integral_constant<int, m>,
// x_group, y_group) runs one group of m rows (m a compile-time constant, so its accumulators are registers)
template <class Kernel>
void in_row_groups(const float *x, float *y, int64_t ldy, int64_t M, int64_t K, Kernel kernel) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float *xg = x + m0 * K;
    float *yg = y + m0 * ldy;
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: kernel(std::integral_constant<int, 1>{}, xg, yg); break;
      case 2: kernel(std::integral_constant<int, 2>{}, xg, yg); break;
      case 3: kernel(std::integral_constant<int, 3>{}, xg, yg); break;
      case 4: kernel(std::integral_constant<int, 4>{}, xg, yg); break;
      case 5: kernel(std::integral_constant<int, 5>{}, xg, yg); break;
      case 6: kernel(std::integral_constant<int, 6>{}, xg, yg); break;
      case 7: kernel(std::integral_constant<int, 7>{}, xg, yg); break;
      default: kernel(std::integral_constant<int, 8>{}, xg, yg); break;
    }
  }
}

#if defined(__x86_64__)
#define MSDFKD_AVX512 __attribute__((target("avx512f,f16c")))

template <int64_t BlockBytes>
MSDFKD_AVX512 inline void block_registers(const uint8_t *blk, __m512 &lo, __m512 &hi) {
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
  if constexpr (BlockBytes == kQ41Bytes) {
    const __m512 m = _mm512_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 4));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m128i q_lo = _mm_and_si128(raw, nibble), q_hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
    lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_lo)), d), m);
    hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q_hi)), d), m);
  } else {
    lo = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 2)))), d);
    hi = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 18)))), d);
  }
}

// R weight rows from n against M (<= 8) rows of x
template <int64_t BlockBytes, int M, int R>
MSDFKD_AVX512 void gguf_tile_avx512(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K, int64_t n) {
  const int64_t nb = K / kBlockValues;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) block_registers<BlockBytes>(w + ((n + r) * nb + b) * BlockBytes, lo[r], hi[r]);
    const float *xb = x + b * kBlockValues;
    for (int m = 0; m < M; ++m) {
      const __m512 x_lo = _mm512_loadu_ps(xb + m * K), x_hi = _mm512_loadu_ps(xb + m * K + 16);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(x_hi, hi[r], _mm512_fmadd_ps(x_lo, lo[r], acc[r][m]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * ldy + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int64_t BlockBytes, int M>
MSDFKD_AVX512 void gguf_rows_avx512_m(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K, int64_t n0,
                                      int64_t n1) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) gguf_tile_avx512<BlockBytes, M, 2>(x, w, y, ldy, K, n);
  for (; n < n1; ++n) gguf_tile_avx512<BlockBytes, M, 1>(x, w, y, ldy, K, n);
}

template <int64_t BlockBytes>
void gguf_rows_avx512(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                      int64_t n1) {
  in_row_groups(x, y, ldy, M, K, [&](auto m, const float *xg, float *yg) {
    gguf_rows_avx512_m<BlockBytes, decltype(m)::value>(xg, w, yg, ldy, K, n0, n1);
  });
}

inline bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  return yes;
}

// AVX2 (most x86 CPUs without AVX-512, e.g. AMD Zen 1-3): 8 lanes, 16 registers, so one weight row at a
// time against up to 8 rows of x (8 accumulators, the block's 4 registers, one for x)
#define MSDFKD_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int64_t BlockBytes>
MSDFKD_AVX2 inline void block_registers_avx2(const uint8_t *blk, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(blk)));
  if constexpr (BlockBytes == kQ41Bytes) {
    // d*q is exact in float32, so the fused multiply-add rounds d*q + m once, as mul then add does
    const __m256 m = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 4));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m128i q_lo = _mm_and_si128(raw, nibble), q_hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q_lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q_lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q_hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q_hi, 8))), d, m);
  } else {
    for (int i = 0; i < 4; ++i)
      w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                               _mm_loadl_epi64(reinterpret_cast<const __m128i *>(blk + 2 + 8 * i)))),
                           d);
  }
}

MSDFKD_AVX2 inline float reduce_add_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int64_t BlockBytes, int M>
MSDFKD_AVX2 void gguf_rows_avx2_m(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K, int64_t n0,
                                  int64_t n1) {
  const int64_t nb = K / kBlockValues;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t *wn = w + n * nb * BlockBytes;
    for (int64_t b = 0; b < nb; ++b) {
      __m256 wb[4];
      block_registers_avx2<BlockBytes>(wn + b * BlockBytes, wb);
      const float *xb = x + b * kBlockValues;
      for (int m = 0; m < M; ++m) {
        const float *xr = xb + m * K;
        __m256 a = _mm256_fmadd_ps(_mm256_loadu_ps(xr), wb[0], acc[m]);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), wb[1], a);
        a = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 16), wb[2], a);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 24), wb[3], a);
      }
    }
    for (int m = 0; m < M; ++m) y[m * ldy + n] = reduce_add_avx2(acc[m]);
  }
}

template <int64_t BlockBytes>
void gguf_rows_avx2(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                    int64_t n1) {
  in_row_groups(x, y, ldy, M, K, [&](auto m, const float *xg, float *yg) {
    gguf_rows_avx2_m<BlockBytes, decltype(m)::value>(xg, w, yg, ldy, K, n0, n1);
  });
}

// interleaved layout: the 8 columns of group g against M (<= 8) rows of x, one accumulator a row; columns
// [n0, n1) of y written (a group cut by the range goes through a buffer)
template <int64_t GroupBytes, int M>
MSDFKD_AVX2 void gguf_rows_x8_avx2_m(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t K, int64_t n0,
                                     int64_t n1) {
  const int64_t nb = K / kBlockValues;
  const __m256i nibble = _mm256_set1_epi32(0x0f);
  for (int64_t g = n0 / kX8Columns; g * kX8Columns < n1; ++g) {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t *wg = w + g * nb * GroupBytes;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t *grp = wg + b * GroupBytes;
      const __m256 d = _mm256_loadu_ps(reinterpret_cast<const float *>(grp));
      const float *xb = x + b * kBlockValues;
      if constexpr (GroupBytes == kQ41x8Bytes) {
        const __m256 mins = _mm256_loadu_ps(reinterpret_cast<const float *>(grp) + 8);
        for (int j = 0; j < 16; ++j) {
          const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(grp + 64 + 8 * j)));
          // d*q is exact in float32, so the fused multiply-add rounds d*q + m once, as mul then add does
          const __m256 w_lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q, nibble)), d, mins);
          const __m256 w_hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)), d, mins);
          for (int m = 0; m < M; ++m) {
            acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + m * K + j), w_lo, acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + m * K + 16 + j), w_hi, acc[m]);
          }
        }
      } else {
        for (int j = 0; j < 32; ++j) {
          const __m256 wj = _mm256_mul_ps(
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(grp + 32 + 8 * j)))),
              d);
          for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(xb + m * K + j), wj, acc[m]);
        }
      }
    }
    const int64_t first = g * kX8Columns, c0 = std::max(n0, first), c1 = std::min(n1, first + kX8Columns);
    if (c0 == first && c1 == first + kX8Columns) {
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * ldy + first, acc[m]);
    } else {
      // acc is read only in loops of constant bounds: any other access (the copy below) kept GCC from holding
      // it in registers, and every multiply-add stored its accumulator (0.5x the speed)
      alignas(32) float part[M * kX8Columns];
      for (int m = 0; m < M; ++m) _mm256_store_ps(part + m * kX8Columns, acc[m]);
      for (int m = 0; m < M; ++m)
        for (int64_t c = c0; c < c1; ++c) y[m * ldy + c] = part[m * kX8Columns + c - first];
    }
  }
}

template <int64_t GroupBytes>
void gguf_rows_x8_avx2(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                       int64_t n1) {
  in_row_groups(x, y, ldy, M, K, [&](auto m, const float *xg, float *yg) {
    gguf_rows_x8_avx2_m<GroupBytes, decltype(m)::value>(xg, w, yg, ldy, K, n0, n1);
  });
}

inline bool have_avx2() {
  static const bool yes =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return yes;
}
#endif

enum GgufLoops { kPortableLoops = 0, kAvx2Loops = 1, kAvx512Loops = 2 };

// the best loops this CPU runs
inline int best_gguf_loops() {
#if defined(__x86_64__)
  if (have_avx512()) return kAvx512Loops;
  if (have_avx2()) return kAvx2Loops;
#endif
  return kPortableLoops;
}

inline int g_gguf_loops = -1;  // MsDfkdGgufSetLoops: the tests run each variant this CPU has; -1: the best

inline int gguf_loops() { return g_gguf_loops < 0 ? best_gguf_loops() : g_gguf_loops; }

template <int64_t BlockBytes>
void gguf_rows_typed(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                     int64_t n1) {
  switch (gguf_loops()) {
#if defined(__x86_64__)
    case kAvx512Loops: gguf_rows_avx512<BlockBytes>(x, w, y, ldy, M, K, n0, n1); return;
    case kAvx2Loops: gguf_rows_avx2<BlockBytes>(x, w, y, ldy, M, K, n0, n1); return;
#endif
    default: gguf_rows_portable<BlockBytes>(x, w, y, ldy, M, K, n0, n1);
  }
}

// the interleaved layout: its AVX2 loops for the AVX2 and AVX-512 settings (an AVX-512 CPU has AVX2)
template <int64_t GroupBytes>
void gguf_rows_x8_typed(const float *x, const uint8_t *w, float *y, int64_t ldy, int64_t M, int64_t K, int64_t n0,
                        int64_t n1) {
#if defined(__x86_64__)
  if (gguf_loops() != kPortableLoops) {
    gguf_rows_x8_avx2<GroupBytes>(x, w, y, ldy, M, K, n0, n1);
    return;
  }
#endif
  gguf_rows_x8_portable<GroupBytes>(x, w, y, ldy, M, K, n0, n1);
}

// columns [n0, n1) of y [M, ldy] = x [M, K] W^T, W as blocks of block_bytes (20: Q4_1, 34: Q8_0; 192, 288:
// the same interleaved); false for another block size
inline bool gguf_rows(const float *x, const uint8_t *w, int64_t block_bytes, float *y, int64_t ldy, int64_t M,
                      int64_t K, int64_t n0, int64_t n1) {
  switch (block_bytes) {
    case kQ41Bytes: gguf_rows_typed<kQ41Bytes>(x, w, y, ldy, M, K, n0, n1); return true;
    case kQ80Bytes: gguf_rows_typed<kQ80Bytes>(x, w, y, ldy, M, K, n0, n1); return true;
    case kQ41x8Bytes: gguf_rows_x8_typed<kQ41x8Bytes>(x, w, y, ldy, M, K, n0, n1); return true;
    case kQ80x8Bytes: gguf_rows_x8_typed<kQ80x8Bytes>(x, w, y, ldy, M, K, n0, n1); return true;
    default: return false;
  }
}

// a block size gguf_rows takes
constexpr bool known_block_bytes(int64_t block_bytes) {
  return block_bytes == kQ41Bytes || block_bytes == kQ80Bytes || block_bytes == kQ41x8Bytes ||
         block_bytes == kQ80x8Bytes;
}

}  // namespace msdfkd
