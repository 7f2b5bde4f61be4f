// What every kernel of the CPU library shares: the thread count, the row splitter, oneDNN's sgemm, e^x.
//
// Each call splits its rows over short-lived threads that are joined before it returns. Not OpenMP: its
// idle workers spin after every parallel region (libgomp's default wait policy), taking the cores from
// MindSpore's own kernels; that made a BERT step slower, not faster.
#pragma once

#include <algorithm>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace msdfkd {

inline int g_threads = 1;  // set by MsDfkdCpuSetThreads (kernels/cpu_ops.py passes the process's cores)

inline int parts_for(int64_t n, int64_t grain) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g_threads, n / std::max<int64_t>(grain, 1))));
}

// [begin, end) of part p of n items in `parts` near-equal parts
inline void split_range(int64_t n, int64_t p, int64_t parts, int64_t &begin, int64_t &end) {
  const int64_t size = (n + parts - 1) / parts;
  begin = std::min(n, p * size);
  end = std::min(n, begin + size);
}

// f(part, begin, end) over [0, n) in parts_for(n, grain) parts; part 0 runs on the calling thread, and
// so does any part whose thread cannot be started (an exception must not cross the C ABI)
template <class F>
void parallel_for(int64_t n, int64_t grain, F f) {
  const int64_t parts = parts_for(n, grain);
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; ++p) {
    int64_t begin, end;
    split_range(n, p, parts, begin, end);
    try {
      workers.emplace_back(f, static_cast<int>(p), begin, end);
    } catch (const std::system_error &) {
      f(static_cast<int>(p), begin, end);
    }
  }
  int64_t begin, end;
  split_range(n, 0, parts, begin, end);
  f(0, begin, end);
  for (auto &w : workers) w.join();
}

// oneDNN's C sgemm: row-major C[M,N] = alpha op(A) op(B) + beta C; sequential when called outside an
// oneDNN threadpool, so each thread runs its own block. Opened by MsDfkdCpuLoadGemm (encoder_ops.cc).
using SgemmFn = int (*)(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                        int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
inline SgemmFn g_sgemm = nullptr;

// C[M,N] = op(A) op(B), split over the rows of C (or its columns where it has fewer rows than columns)
inline void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                 int64_t ldb, float *C, int64_t ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  constexpr int64_t kRows = 32;  // below this many rows or columns a part a thread is not worth it
  if (M >= N) {
    parallel_for(M, kRows, [=](int, int64_t begin, int64_t end) {
      g_sgemm(a, b, end - begin, N, K, 1.0f, ta ? A + begin : A + begin * lda, lda, B, ldb, 0.0f, C + begin * ldc,
              ldc);
    });
  } else {
    parallel_for(N, kRows, [=](int, int64_t begin, int64_t end) {
      g_sgemm(a, b, M, end - begin, K, 1.0f, A, lda, tb ? B + begin * ldb : B + begin, ldb, 0.0f, C + begin, ldc);
    });
  }
}

// e^x for x <= 0, written so that GCC vectorises it: Cody-Waite reduction to |r| <= ln2/2, a degree-7
// Taylor polynomial (relative error < 2e-8 there), and 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest: for y <= 0, truncating y - 0.5 toward zero rounds y (floor is a call on SSE2)
  const int32_t k = static_cast<int32_t>(x * 1.4426950408889634f - 0.5f);
  const float n = static_cast<float>(k);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (k + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

}  // namespace msdfkd
