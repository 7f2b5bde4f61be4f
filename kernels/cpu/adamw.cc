// The AdamW update in place, one MindSpore `aot` op per parameter (kernels/cpu_ops.py, ``adamw_update``).
//
// Why: MindSpore's CPU AdamWeightDecay kernel has vector loops for AVX-512 only; elsewhere it runs a
// scalar loop (a student step's 17M values took 45-60 ms). This is that loop's arithmetic, element for
// element, with its fused multiply-adds and its float64 last line, written so that GCC vectorises it
// (x86-64-v3 where the CPU has it, chosen at load time): the same float32 results to the bit.
//     m = fma(g - m, 1 - beta1, m);   v = fma(fma(g, g, -v), 1 - beta2, v)                     (float32)
//     p -= lr (m / (sqrt(v) + eps) + decay p)             (float64, decay p in float32; p rounded once)
// The op writes param, m and v where they are (the parameters' own memory); kernels/cpu_ops.py declares
// its memory side effect, and its one output is a [1] flag.
#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

__attribute__((target_clones("arch=x86-64-v3", "default"))) void adamw_range(float *__restrict p, float *__restrict m,
                                                                   float *__restrict v, const float *__restrict g,
                                                                   float lr, float beta1_minus, float beta2_minus,
                                                                   float eps, float decay, int64_t begin,
                                                                   int64_t end) {
  const double lr_d = lr, eps_d = eps;
  for (int64_t i = begin; i < end; ++i) {
    const float mi = std::fma(g[i] - m[i], beta1_minus, m[i]);
    const float vi = std::fma(std::fma(g[i], g[i], -v[i]), beta2_minus, v[i]);
    m[i] = mi;
    v[i] = vi;
    const float decayed = decay * p[i];
    p[i] = static_cast<float>(static_cast<double>(p[i]) -
                              lr_d * (static_cast<double>(mi) / (std::sqrt(static_cast<double>(vi)) + eps_d) +
                                      static_cast<double>(decayed)));
  }
}

}  // namespace

extern "C" {

// params: param, m, v, grad (float32, one shape), hyper [lr, beta1, beta2, eps, decay] float32; out: done [1]
int MsDfkdAdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 6) return 1;
  float *p = static_cast<float *>(params[0]);
  float *m = static_cast<float *>(params[1]);
  float *v = static_cast<float *>(params[2]);
  const float *g = static_cast<const float *>(params[3]);
  const float *hyper = static_cast<const float *>(params[4]);
  int64_t n = 1;
  for (int i = 0; i < ndims[0]; ++i) n *= shapes[0][i];
  const float lr = hyper[0], beta1_minus = 1.0f - hyper[1], beta2_minus = 1.0f - hyper[2];
  const float eps = hyper[3], decay = hyper[4];
  msdfkd::parallel_for(n, 1 << 16, [=](int, int64_t begin, int64_t end) {
    adamw_range(p, m, v, g, lr, beta1_minus, beta2_minus, eps, decay, begin, end);
  });
  *static_cast<float *>(params[5]) = 1.0f;
  return 0;
}

}  // extern "C"
