// The encoder's GELU and LayerNorm on CPU, forward and backward, its linear layers' backward, and a linear
// layer over a batch's real rows only (forward and backward), as
// MindSpore `aot` custom ops (kernels/cpu_ops.py; built by kernels/cpu_build.py).
//
// Why: MindSpore's CPU Erf, and the elementwise ops around it, run one element at a time, and its
// LayerNormGrad is slow on narrow rows; a BERT step spends a quarter of its time in them. These loops
// are written so that GCC vectorises them at -O3 (no calls, no branches: compile with
// -fno-trapping-math), and each call splits its rows over threads (common.h).
//
// The linear backward's products go to oneDNN's sgemm, from the libdnnl that MindSpore's wheel ships
// (MsDfkdCpuLoadGemm; kernels/cpu_ops.py passes its path): MindSpore's own backward of a matmul
// transposes its operands first and sums the bias gradient in a separate op.
//
// C ABI of MindSpore's aot ops: params holds the inputs, then the outputs; float32 only.
#include <dlfcn.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <vector>

#include "common.h"

namespace {

using msdfkd::exp_nonpositive;
using msdfkd::gemm;
using msdfkd::parallel_for;
using msdfkd::parts_for;

// below this many values a second thread costs more than it saves
constexpr int64_t kGrain = 1 << 15;

// erf(|x| / sqrt(2)) and exp(-x^2 / 2): erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), whose
// factor exp(-z^2) with z = |x|/sqrt(2) is also the normal density's.
inline float erf_abs_scaled(float x, float &e) {
  const float z = std::fabs(x) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly =
      t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  e = exp_nonpositive(-z * z);
  return 1.0f - poly * e;
}

// Phi(x) = P(N(0,1) <= x)
inline float normal_cdf(float x) {
  float e;
  return 0.5f + 0.5f * std::copysign(erf_abs_scaled(x, e), x);
}

// d/dx [x Phi(x)] = Phi(x) + x phi(x)
inline float gelu_slope(float x) {
  float e;
  const float cdf = 0.5f + 0.5f * std::copysign(erf_abs_scaled(x, e), x);
  return cdf + x * 0.3989422804014327f * e;
}

int64_t numel(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

void gelu_forward_range(const float *__restrict x, float *__restrict y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) y[i] = x[i] * normal_cdf(x[i]);
}

void gelu_backward_range(const float *__restrict x, const float *__restrict dy, float *__restrict dx,
                         int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) dx[i] = dy[i] * gelu_slope(x[i]);
}

// The masked linear layer: the same products over the rows whose mask is nonzero only (a batch's real
// tokens; padding is about a third of a student batch), packed together so that each product is one
// sgemm. Masked rows give y = 0 and dx = 0 and add nothing to dw and db.

// indices of the rows whose mask is nonzero
void real_rows(const float *mask, int64_t rows, std::vector<int64_t> &out) {
  out.clear();
  for (int64_t i = 0; i < rows; ++i)
    if (mask[i] != 0.0f) out.push_back(i);
}

// dst[j] = src[index[j]] for rows of width w
void gather_rows(const float *src, const std::vector<int64_t> &index, int64_t w, float *dst) {
  const int64_t *idx = index.data();
  parallel_for(static_cast<int64_t>(index.size()), kGrain / w + 1, [=](int, int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) std::copy(src + idx[j] * w, src + (idx[j] + 1) * w, dst + j * w);
  });
}

// dst[index[j]] = src[j] (+ bias), every other row of dst 0; dst has `rows` rows of width w
void scatter_rows(const float *src, const std::vector<int64_t> &index, int64_t rows, int64_t w, const float *bias,
                  float *dst) {
  const int64_t *idx = index.data();
  const int64_t nr = static_cast<int64_t>(index.size());
  parallel_for(rows, kGrain / w + 1, [=](int, int64_t begin, int64_t end) {
    // the packed rows that land in [begin, end): index is increasing
    int64_t j = std::lower_bound(idx, idx + nr, begin) - idx;
    for (int64_t r = begin; r < end; ++r) {
      float *__restrict out = dst + r * w;
      if (j < nr && idx[j] == r) {
        const float *__restrict in = src + j * w;
        if (bias) {
          for (int64_t c = 0; c < w; ++c) out[c] = in[c] + bias[c];
        } else {
          for (int64_t c = 0; c < w; ++c) out[c] = in[c];
        }
        ++j;
      } else {
        for (int64_t c = 0; c < w; ++c) out[c] = 0.0f;
      }
    }
  });
}

// scratch buffers kept per thread across calls: a fresh multi-megabyte vector a call costs page faults
std::vector<float> &scratch(int which, size_t n) {
  thread_local std::vector<float> buffers[3];
  if (buffers[which].size() < n) buffers[which].resize(n);
  return buffers[which];
}

// out[c] = the sum of src's rows' column c (src [rows, n]), split over columns
void column_sums(const float *src, int64_t rows, int64_t n, float *out) {
  parallel_for(n, 64, [=](int, int64_t begin, int64_t end) {
    float *__restrict o = out + begin;
    const int64_t width = end - begin;
    for (int64_t j = 0; j < width; ++j) o[j] = 0.0f;
    for (int64_t i = 0; i < rows; ++i) {
      const float *__restrict row = src + i * n + begin;
      for (int64_t j = 0; j < width; ++j) o[j] += row[j];
    }
  });
}

}  // namespace

extern "C" {

void MsDfkdCpuSetThreads(int n) { msdfkd::g_threads = n > 0 ? n : 1; }

// 0 once dnnl_sgemm is found in the library at path (opened once; a later call changes nothing);
// 1 if the library cannot be opened, 2 if it has no dnnl_sgemm
int MsDfkdCpuLoadGemm(const char *path) {
  using msdfkd::g_sgemm;
  if (g_sgemm) return 0;
  void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!handle) return 1;
  g_sgemm = reinterpret_cast<msdfkd::SgemmFn>(dlsym(handle, "dnnl_sgemm"));
  return g_sgemm ? 0 : 2;
}

// y = x w^T + b; its backward in two ops, so that a graph whose weights take no gradient (a frozen
// encoder the generator's loss goes through) drops the second: dx = dy w,
//                                                params: dy [.., n], w [n, k], dx [.., k]
int MsDfkdLinearBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  if (nparam != 3 || !msdfkd::g_sgemm) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = shapes[1][0], k = shapes[1][1];
  const int64_t rows = numel(ndims[0], shapes[0]) / n;
  gemm(false, false, rows, k, n, dy, n, w, k, dx, k);
  return 0;
}

// and dw = dy^T x, db = the sum of dy's rows     params: dy [.., n], x [.., k], dw [n, k], db [n]
int MsDfkdLinearBackwardWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  if (nparam != 4 || !msdfkd::g_sgemm) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dw = static_cast<float *>(params[2]);
  float *db = static_cast<float *>(params[3]);
  const int64_t n = shapes[2][0], k = shapes[2][1];
  const int64_t rows = numel(ndims[1], shapes[1]) / k;
  gemm(true, false, n, k, rows, dy, n, x, k, dw, k);
  column_sums(dy, rows, n, db);
  return 0;
}

// y = (x w^T + b) on rows whose mask is nonzero, 0 on the others
//                                                params: x [.., k], w [n, k], b [n], mask [..], y [.., n]
int MsDfkdMaskedLinearForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  if (nparam != 5 || !msdfkd::g_sgemm) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float *mask = static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  const int64_t n = shapes[1][0], k = shapes[1][1];
  const int64_t rows = numel(ndims[3], shapes[3]);
  thread_local std::vector<int64_t> index;
  real_rows(mask, rows, index);
  const int64_t nr = static_cast<int64_t>(index.size());
  float *xp = scratch(0, nr * k).data();
  float *yp = scratch(1, nr * n).data();
  if (nr > 0) {
    gather_rows(x, index, k, xp);
    gemm(false, true, nr, n, k, xp, k, w, k, yp, n);
  }
  scatter_rows(yp, index, rows, n, b, y);
  return 0;
}

// the backward of MsDfkdMaskedLinearForward in two ops (as MsDfkdLinearBackwardData/Weight): dx = dy w on
// the rows whose mask is nonzero, 0 on the others,
//                                                params: dy [.., n], w [n, k], mask [..], dx [.., k]
int MsDfkdMaskedLinearBackwardData(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                   void *stream, void *extra) {
  if (nparam != 4 || !msdfkd::g_sgemm) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *mask = static_cast<const float *>(params[2]);
  float *dx = static_cast<float *>(params[3]);
  const int64_t n = shapes[1][0], k = shapes[1][1];
  const int64_t rows = numel(ndims[2], shapes[2]);
  thread_local std::vector<int64_t> index;
  real_rows(mask, rows, index);
  const int64_t nr = static_cast<int64_t>(index.size());
  float *dyp = scratch(0, nr * n).data();
  float *dxp = scratch(2, nr * k).data();
  if (nr > 0) {
    gather_rows(dy, index, n, dyp);
    gemm(false, false, nr, k, n, dyp, n, w, k, dxp, k);
  }
  scatter_rows(dxp, index, rows, k, nullptr, dx);
  return 0;
}

// and dw = dy^T x, db = the sum of dy, over those rows
//                                                params: dy [.., n], x [.., k], mask [..], dw [n, k], db [n]
int MsDfkdMaskedLinearBackwardWeight(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  if (nparam != 5 || !msdfkd::g_sgemm) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *mask = static_cast<const float *>(params[2]);
  float *dw = static_cast<float *>(params[3]);
  float *db = static_cast<float *>(params[4]);
  const int64_t n = shapes[3][0], k = shapes[3][1];
  const int64_t rows = numel(ndims[2], shapes[2]);
  thread_local std::vector<int64_t> index;
  real_rows(mask, rows, index);
  const int64_t nr = static_cast<int64_t>(index.size());
  if (nr == 0) {
    std::fill(dw, dw + n * k, 0.0f);
    std::fill(db, db + n, 0.0f);
    return 0;
  }
  float *dyp = scratch(0, nr * n).data();
  float *xp = scratch(1, nr * k).data();
  gather_rows(dy, index, n, dyp);
  gather_rows(x, index, k, xp);
  gemm(true, false, n, k, nr, dyp, n, xp, k, dw, k);
  column_sums(dyp, nr, n, db);
  return 0;
}

// y = x * Phi(x)    (exact GELU)                 params: x, y
int MsDfkdGeluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                      void *extra) {
  if (nparam != 2) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  float *__restrict y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_for(n, kGrain, [=](int, int64_t begin, int64_t end) { gelu_forward_range(x, y, begin, end); });
  return 0;
}

// dx = dy * (Phi(x) + x * phi(x))                params: x, dy, dx
int MsDfkdGeluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if (nparam != 3) return 1;
  const float *__restrict x = static_cast<const float *>(params[0]);
  const float *__restrict dy = static_cast<const float *>(params[1]);
  float *__restrict dx = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_for(n, kGrain, [=](int, int64_t begin, int64_t end) { gelu_backward_range(x, dy, dx, begin, end); });
  return 0;
}

// LayerNorm over the last axis.  params: x [rows, d], gamma [d], beta [d], eps [1], y, mean [rows], rstd [rows]
int MsDfkdLayerNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 7) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *g = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  float *mean_out = static_cast<float *>(params[5]);
  float *rstd_out = static_cast<float *>(params[6]);
  const int64_t d = shapes[0][ndims[0] - 1];
  if (d == 0) return 0;
  const int64_t rows = numel(ndims[0], shapes[0]) / d;
  parallel_for(rows, kGrain / d + 1, [=](int, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * d;
      float *yr = y + r * d;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < d; ++j) sum += xr[j];
      const float mean = sum / d;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) sq += (xr[j] - mean) * (xr[j] - mean);
      const float rstd = 1.0f / std::sqrt(sq / d + eps);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] - mean) * rstd * g[j] + b[j];
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
  return 0;
}

// params: dy, x, gamma, mean, rstd, dx, dgamma, dbeta
int MsDfkdLayerNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  if (nparam != 8) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *g = static_cast<const float *>(params[2]);
  const float *mean = static_cast<const float *>(params[3]);
  const float *rstd = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dg = static_cast<float *>(params[6]);
  float *db = static_cast<float *>(params[7]);
  const int64_t d = shapes[1][ndims[1] - 1];
  if (d == 0) return 0;
  const int64_t rows = numel(ndims[1], shapes[1]) / d;
  const int64_t grain = kGrain / d + 1;
  const int nt = parts_for(rows, grain);
  // each part sums its rows' dgamma and dbeta into its own slice; the slices are added after the join
  std::vector<float> partial(static_cast<size_t>(nt) * 2 * d, 0.0f);
  float *partial_data = partial.data();
  parallel_for(rows, grain, [=](int part, int64_t begin, int64_t end) {
    float *pg = partial_data + static_cast<size_t>(part) * 2 * d;
    float *pb = pg + d;
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * d;
      const float *dyr = dy + r * d;
      float *dxr = dx + r * d;
      const float m = mean[r], s = rstd[r];
      float sum_dxhat = 0.0f, sum_dxhat_xhat = 0.0f;
#pragma omp simd reduction(+ : sum_dxhat, sum_dxhat_xhat)
      for (int64_t j = 0; j < d; ++j) {
        const float xhat = (xr[j] - m) * s;
        const float dxhat = dyr[j] * g[j];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += dxhat * xhat;
        pg[j] += dyr[j] * xhat;
        pb[j] += dyr[j];
      }
      const float a = sum_dxhat / d, c = sum_dxhat_xhat / d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        const float xhat = (xr[j] - m) * s;
        dxr[j] = s * (dyr[j] * g[j] - a - xhat * c);
      }
    }
  });
  for (int64_t j = 0; j < d; ++j) {
    float sg = 0.0f, sb = 0.0f;
    for (int t = 0; t < nt; ++t) {
      sg += partial[static_cast<size_t>(t) * 2 * d + j];
      sb += partial[static_cast<size_t>(t) * 2 * d + d + j];
    }
    dg[j] = sg;
    db[j] = sb;
  }
  return 0;
}

}  // extern "C"
