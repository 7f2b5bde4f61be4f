// One decoder layer of a Llama-family model (SmolLM2, Qwen2) for one new token per row, against a KV
// cache, as one MindSpore `aot` op (kernels/cpu_ops.py): RMSNorm, the q/k/v projections (and Qwen2's
// biases), rotary embedding ("rotate half"), the cache write, grouped-query attention over the cache,
// the output projection, RMSNorm and the SwiGLU MLP, with both residuals. Forward only (sampling).
//
// Why: a decode step of SmolLM2 at 8 rows is about 900 small MindSpore ops, whose launches and
// broadcasts took two thirds of the step; the products themselves (oneDNN's sgemm from MindSpore's
// wheel, as encoder_ops.cc) are a third. Here a layer is one op, its threads are started once per layer
// and meet at spin barriers between the phases (each phase is tens of microseconds to a millisecond:
// starting threads per phase would cost more).
//
// Each weight matrix comes either as float32 [out, in] or as a GGUF file's Q4_1 / Q8_0 blocks
// [out, in / 32, 20 or 34] (gguf_blocks.h; the sampler passes blocks for the layers that do not train).
//
// The arithmetic follows models/llama.py in float32: x * rsqrt(mean(x^2) + eps) * w; q * cos +
// rotate_half(q) * sin; softmax(q k / sqrt(D)) over the readable slots (the masked ones get exactly zero
// weight there too); silu(g) * u = g / (1 + exp(-g)) * u. Sums run in another order than MindSpore's, and
// e^x is common.h's polynomial (within 2e-8 of libm's, relative).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "gguf_blocks.h"

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

constexpr int kSpins = 1 << 14;  // about 0.1-0.5 ms of pause instructions

// the threads of one call: part 0 is the caller; they meet at wait()
class Team {
 public:
  explicit Team(int parts) : parts_(parts) {}
  int parts() const { return parts_; }
  void wait() {
    const int gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == parts_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    } else {
      // spin a while (a phase takes microseconds to a millisecond), then yield: where another process holds
      // the core the partner needs (two jobs on two cores), spinning would only hold it up
      for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
        if (spins < kSpins)
          cpu_relax();
        else
          std::this_thread::yield();
      }
    }
  }

 private:
  int parts_;
  std::atomic<int> arrived_{0}, generation_{0};
};

// f(team, part) on `parts` threads, part 0 on the caller. The team's size is fixed before any part runs:
// a thread that cannot be started shrinks it (the barriers count the threads that run)
template <class F>
void run_team(int parts, F f) {
  std::atomic<int> go{0};
  std::vector<std::thread> workers;
  std::atomic<Team *> team_slot{nullptr};
  for (int p = 1; p < parts; ++p) {
    try {
      workers.emplace_back([&, p] {
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
        Team *team = team_slot.load(std::memory_order_acquire);
        if (p < team->parts()) f(*team, p);
      });
    } catch (const std::system_error &) {
      break;
    }
  }
  Team team(static_cast<int>(workers.size()) + 1);
  team_slot.store(&team, std::memory_order_release);
  go.store(1, std::memory_order_release);
  f(team, 0);
  for (auto &w : workers) w.join();
}

using msdfkd::split_range;

void rms_norm(const float *x, const float *w, float eps, float *y, int64_t rows, int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = x + r * d;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    const float s = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int64_t j = 0; j < d; ++j) y[r * d + j] = xr[j] * s * w[j];
  }
}

// a layer's work buffers (every value written before it is read), kept per calling thread across calls: a
// fresh zeroed vector a call (8 MB for a prefill layer of 250 tokens) cost about 4% of a prefill in its
// allocation, zeroing and page faults
float *work_buffer(size_t n) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// a weight matrix [n, k]: float32, or GGUF blocks of block_bytes each
struct Matrix {
  const void *data;
  int64_t block_bytes;  // 0: float32
};

// out[:, begin:end] = a [rows, k] w[begin:end, :]^T; out has n columns
inline void project(const float *a, Matrix w, float *out, int64_t rows, int64_t n, int64_t k, int64_t begin,
                    int64_t end) {
  if (end <= begin) return;
  if (w.block_bytes) {
    msdfkd::gguf_rows(a, static_cast<const uint8_t *>(w.data), w.block_bytes, out, n, rows, k, begin, end);
  } else {
    msdfkd::g_sgemm('N', 'T', rows, end - begin, k, 1.0f, a, k, static_cast<const float *>(w.data) + begin * k, k,
                    0.0f, out + begin, n);
  }
}

// q, k, v = a wq^T, a wk^T, a wv^T for columns [begin, end) of the three stacked (nq + 2 nk columns)
inline void project_qkv(const float *a, Matrix wq, Matrix wk, Matrix wv, float *q, float *k, float *v, int64_t rows,
                        int64_t nq, int64_t nk, int64_t width, int64_t begin, int64_t end) {
  project(a, wq, q, rows, nq, width, std::min(begin, nq), std::min(end, nq));
  project(a, wk, k, rows, nk, width, std::clamp(begin - nq, int64_t{0}, nk), std::clamp(end - nq, int64_t{0}, nk));
  project(a, wv, v, rows, nk, width, std::clamp(begin - nq - nk, int64_t{0}, nk),
          std::clamp(end - nq - nk, int64_t{0}, nk));
}

// g[:, begin:end] = silu(a w_gate^T) * (a w_up^T) over those columns (u: the up product's buffer)
inline void swiglu(const float *a, Matrix w_gate, Matrix w_up, float *g, float *u, int64_t rows, int64_t n,
                   int64_t width, int64_t begin, int64_t end) {
  project(a, w_gate, g, rows, n, width, begin, end);
  project(a, w_up, u, rows, n, width, begin, end);
  // silu(g) = g / (1 + e^-g) from e = e^-|g| <= 1, so that the loop vectorises (libm's expf is a call a
  // value): g / (1 + e) for g >= 0, g e / (1 + e) below
  for (int64_t r = 0; r < rows; ++r) {
    float *gr = g + r * n;
    const float *ur = u + r * n;
#pragma omp simd
    for (int64_t j = begin; j < end; ++j) {
      const float gj = gr[j], e = msdfkd::exp_nonpositive(-std::fabs(gj));
      gr[j] = gj * ((gj >= 0.0f ? 1.0f : e) / (1.0f + e)) * ur[j];
    }
  }
}

// the output rows of param p's matrix: float32 [out, in], blocks [out, in / 32, bytes] or interleaved blocks
// [out / 8, in / 32, bytes]
inline int64_t matrix_rows(int p, const int *ndims, int64_t **shapes) {
  return ndims[p] == 3 ? shapes[p][0] * msdfkd::block_columns(shapes[p][2]) : shapes[p][0];
}

// the layer's 7 matrices from the op's params 8-11 (wq wk wv wo) and 16-18 (w_gate w_up w_down), each float32
// [out, in] or GGUF blocks [out, in / 32, bytes] (or interleaved, [out / 8, in / 32, bytes]); false if one has
// the wrong width or block size
inline bool layer_matrices(void **params, const int *ndims, int64_t **shapes, int64_t H, int64_t nq, int64_t nk,
                           int64_t I, Matrix m[7]) {
  const int64_t widths[] = {H, H, H, nq, H, H, I}, outs[] = {nq, nk, nk, H, I, I, H};
  for (int i = 0; i < 7; ++i) {
    const int p = i < 4 ? 8 + i : 12 + i;
    const bool blocks = ndims[p] == 3;
    const int64_t width = blocks ? shapes[p][1] * msdfkd::kBlockValues : shapes[p][1];
    if (width != widths[i] || matrix_rows(p, ndims, shapes) != outs[i] ||
        (blocks && !msdfkd::known_block_bytes(shapes[p][2])))
      return false;
    m[i] = Matrix{params[p], blocks ? shapes[p][2] : 0};
  }
  return true;
}

// x*cos + rotate_half(x)*sin for one head of D values
inline void rope(float *x, const float *cos, const float *sin, int64_t d) {
  const int64_t half = d / 2;
  float tmp[512];
  for (int64_t j = 0; j < d; ++j) tmp[j] = x[j];
  for (int64_t j = 0; j < half; ++j) x[j] = tmp[j] * cos[j] + (-tmp[half + j]) * sin[j];
  for (int64_t j = half; j < d; ++j) x[j] = tmp[j] * cos[j] + tmp[j - half] * sin[j];
}

}  // namespace

extern "C" {

// params: x [B, H], cos [B, D], sin [B, D], key_mask [B, S] f32 (1 = readable, the written slot included),
//         write_slot [S] int32 (1 at the slot the new key/value goes to), cache_k [B, n_kv, S, D], cache_v,
//         input_norm [H], wq [n_heads*D, H], wk [n_kv*D, H], wv [n_kv*D, H], wo [H, n_heads*D] (each
//         matrix float32 [out, in] or uint8 GGUF blocks [out, in / 32, 20 | 34]),
//         bq [n_heads*D], bk [n_kv*D], bv [n_kv*D] (zeros without biases), post_norm [H],
//         w_gate [I, H], w_up [I, H], w_down [H, I], eps [1];
//         output x_out [B, H]; the new key and value are written into cache_k and cache_v where they are (a
//         copy of both caches a layer, 38 MB a step at 8 rows and 104 slots, was a ninth of the step), which
//         kernels/cpu_ops.py declares as MindSpore declares its own in-place optimizer ops
int MsDfkdLlamaDecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  if (nparam != 21 || !msdfkd::g_sgemm) return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *x = in(0), *cos = in(1), *sin = in(2), *key_mask = in(3);
  const int32_t *write_slot = static_cast<const int32_t *>(params[4]);
  float *cache_k = static_cast<float *>(params[5]), *cache_v = static_cast<float *>(params[6]);
  const float *input_norm = in(7);
  const float *bq = in(12), *bk = in(13), *bv = in(14), *post_norm = in(15);
  const float eps = *in(19);
  float *x_out = static_cast<float *>(params[20]);

  const int64_t B = shapes[0][0], H = shapes[0][1];
  const int64_t n_kv = shapes[5][1], S = shapes[5][2], D = shapes[5][3];
  const int64_t nq = matrix_rows(8, ndims, shapes), nk = matrix_rows(9, ndims, shapes);
  const int64_t I = matrix_rows(16, ndims, shapes);
  const int64_t n_heads = nq / D, n_rep = n_heads / n_kv;
  if (D > 512 || D % 2 || n_heads % n_kv || nk != n_kv * D) return 1;
  // the matrices and the width each takes: float32 [out, in] or blocks [out, in / 32, bytes]
  Matrix m[7];
  if (!layer_matrices(params, ndims, shapes, H, nq, nk, I, m)) return 1;
  const Matrix wq = m[0], wk = m[1], wv = m[2], wo = m[3], w_gate = m[4], w_up = m[5], w_down = m[6];
  int64_t slot = -1;
  for (int64_t s = 0; s < S; ++s)
    if (write_slot[s]) slot = s;
  if (slot < 0) return 1;

  float *h = work_buffer(B * (H + nq + 2 * nk + nq + H + H + H + 2 * I + H));
  float *q = h + B * H, *k = q + B * nq, *v = k + B * nk, *attn = v + B * nk, *o = attn + B * nq;
  float *x1 = o + B * H, *h2 = x1 + B * H, *g = h2 + B * H, *u = g + B * I, *d = u + B * I;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t n_qkv = nq + 2 * nk;
  constexpr int64_t kMinRowsPerPart = 64;  // a part of a product below this many weight rows is not worth a thread
  const int parts = msdfkd::parts_for(H, kMinRowsPerPart);

  run_team(parts, [&](Team &team, int p) {
    const int np = team.parts();
    int64_t b0, b1;
    if (p == 0) rms_norm(x, input_norm, eps, h, B, H);
    team.wait();
    // q, k, v: this part's slice of their stacked rows
    split_range(n_qkv, p, np, b0, b1);
    project_qkv(h, wq, wk, wv, q, k, v, B, nq, nk, H, b0, b1);
    team.wait();
    // per (row, kv head): biases, rotary, the cache copied with the new key/value, attention of its q heads
    split_range(B * n_kv, p, np, b0, b1);
    std::vector<float> scores(S);
    for (int64_t unit = b0; unit < b1; ++unit) {
      const int64_t b = unit / n_kv, kv = unit % n_kv;
      const float *cb = cos + b * D, *sb = sin + b * D;
      float *kr = k + b * nk + kv * D, *vr = v + b * nk + kv * D;
      for (int64_t j = 0; j < D; ++j) {
        kr[j] += bk[kv * D + j];
        vr[j] += bv[kv * D + j];
      }
      rope(kr, cb, sb, D);
      const int64_t plane = (b * n_kv + kv) * S * D;
      std::memcpy(cache_k + plane + slot * D, kr, D * sizeof(float));  // in place: the rest of the plane stays
      std::memcpy(cache_v + plane + slot * D, vr, D * sizeof(float));
      const float *keys = cache_k + plane, *values = cache_v + plane, *mask = key_mask + b * S;
      for (int64_t r = 0; r < n_rep; ++r) {
        const int64_t head = kv * n_rep + r;
        float *qr = q + b * nq + head * D;
        for (int64_t j = 0; j < D; ++j) qr[j] += bq[head * D + j];
        rope(qr, cb, sb, D);
        float top = -INFINITY;
        for (int64_t s = 0; s < S; ++s) {
          if (mask[s] <= 0.0f) continue;
          float dot = 0.0f;
          // a vectorised sum (-fopenmp-simd): the strict-order scalar one took 5-8 ms of a 41-45 ms step
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < D; ++j) dot += qr[j] * keys[s * D + j];
          scores[s] = dot * scale;
          top = std::max(top, scores[s]);
        }
        float total = 0.0f;  // (a masked slot's score is stale: min() keeps its discarded e^x finite)
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < S; ++s) {
          scores[s] = mask[s] > 0.0f ? msdfkd::exp_nonpositive(std::min(scores[s] - top, 0.0f)) : 0.0f;
          total += scores[s];
        }
        float *out = attn + b * nq + head * D;
        for (int64_t j = 0; j < D; ++j) out[j] = 0.0f;
        for (int64_t s = 0; s < S; ++s) {
          if (mask[s] <= 0.0f) continue;
          const float weight = scores[s] / total;
          for (int64_t j = 0; j < D; ++j) out[j] += weight * values[s * D + j];
        }
      }
    }
    team.wait();
    split_range(H, p, np, b0, b1);
    project(attn, wo, o, B, H, nq, b0, b1);
    team.wait();
    if (p == 0) {
      for (int64_t i = 0; i < B * H; ++i) x1[i] = x[i] + o[i];
      rms_norm(x1, post_norm, eps, h2, B, H);
    }
    team.wait();
    split_range(I, p, np, b0, b1);
    swiglu(h2, w_gate, w_up, g, u, B, I, H, b0, b1);
    team.wait();
    split_range(H, p, np, b0, b1);
    project(g, w_down, d, B, H, I, b0, b1);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t j = b0; j < b1; ++j) x_out[r * H + j] = x1[r * H + j] + d[r * H + j];
  });
  return 0;
}


// The same layer for a chunk of L tokens per row (the prompt's prefill) against a cache whose earlier slots
// hold a shared prompt start (or nothing): token j of row b goes to slot first_slot + j and reads the
// readable slots up to its own. Only the real tokens (key_mask 1 at their slot) are computed: they are
// packed into rows before every product, so the left padding of the chunk costs nothing; a pad token's
// output is its input and its cache slots keep the input cache's values (key_mask 0: never read).
// Attention runs as two sgemm products per (row, kv head), over the slots up to the chunk's end.
// params: x [B, L, H], cos [B, L, D], sin [B, L, D], key_mask [B, S] f32, first_slot [1] int32, the rest as
//         MsDfkdLlamaDecodeLayer; outputs x_out [B, L, H], cache_k_out, cache_v_out
int MsDfkdLlamaChunkLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  if (nparam != 23 || !msdfkd::g_sgemm || ndims[0] != 3) return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *x = in(0), *cos = in(1), *sin = in(2), *key_mask = in(3);
  const int64_t w0 = *static_cast<const int32_t *>(params[4]);
  const float *cache_k = in(5), *cache_v = in(6), *input_norm = in(7);
  const float *bq = in(12), *bk = in(13), *bv = in(14), *post_norm = in(15);
  const float eps = *in(19);
  float *x_out = static_cast<float *>(params[20]);
  float *k_out = static_cast<float *>(params[21]);
  float *v_out = static_cast<float *>(params[22]);

  const int64_t B = shapes[0][0], L = shapes[0][1], H = shapes[0][2];
  const int64_t n_kv = shapes[5][1], S = shapes[5][2], D = shapes[5][3];
  const int64_t nq = matrix_rows(8, ndims, shapes), nk = matrix_rows(9, ndims, shapes);
  const int64_t I = matrix_rows(16, ndims, shapes);
  const int64_t n_heads = nq / D, n_rep = n_heads / n_kv;
  if (D > 512 || D % 2 || n_heads % n_kv || nk != n_kv * D || w0 < 0 || w0 + L > S) return 1;
  Matrix m[7];
  if (!layer_matrices(params, ndims, shapes, H, nq, nk, I, m)) return 1;
  const Matrix wq = m[0], wk = m[1], wv = m[2], wo = m[3], w_gate = m[4], w_up = m[5], w_down = m[6];

  // the real tokens, packed: token (b, j) is row packed[b * L + j] (-1: padding); rows of one b are in order
  std::vector<int64_t> packed(B * L, -1), token;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < L; ++j)
      if (key_mask[b * S + w0 + j] > 0.0f) {
        packed[b * L + j] = static_cast<int64_t>(token.size());
        token.push_back(b * L + j);
      }
  const int64_t R = static_cast<int64_t>(token.size());
  for (int64_t t = 0; t < B * L; ++t)  // padding passes through
    if (packed[t] < 0) std::memcpy(x_out + t * H, x + t * H, H * sizeof(float));
  if (R == 0) {
    std::memcpy(k_out, cache_k, B * n_kv * S * D * sizeof(float));
    std::memcpy(v_out, cache_v, B * n_kv * S * D * sizeof(float));
    return 0;
  }

  float *xp = work_buffer(R * (H + H + nq + 2 * nk + nq + H + H + H + 2 * I + H));
  float *h = xp + R * H, *q = h + R * H, *k = q + R * nq, *v = k + R * nk, *attn = v + R * nk;
  float *o = attn + R * nq, *x1 = o + R * H, *h2 = x1 + R * H, *g = h2 + R * H, *u = g + R * I, *d = u + R * I;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t n_qkv = nq + 2 * nk, span = w0 + L;  // no token reads a slot past the chunk
  constexpr int64_t kMinRowsPerPart = 64;
  const int parts = msdfkd::parts_for(H, kMinRowsPerPart);

  run_team(parts, [&](Team &team, int p) {
    const int np = team.parts();
    int64_t b0, b1;
    split_range(R, p, np, b0, b1);
    for (int64_t r = b0; r < b1; ++r) std::memcpy(xp + r * H, x + token[r] * H, H * sizeof(float));
    rms_norm(xp + b0 * H, input_norm, eps, h + b0 * H, b1 - b0, H);
    team.wait();
    split_range(n_qkv, p, np, b0, b1);
    project_qkv(h, wq, wk, wv, q, k, v, R, nq, nk, H, b0, b1);
    team.wait();
    // per (row, kv head): its tokens' keys/values into the cache, then its q heads' attention
    split_range(B * n_kv, p, np, b0, b1);
    std::vector<float> qt, scores, ot;
    for (int64_t unit = b0; unit < b1; ++unit) {
      const int64_t b = unit / n_kv, kv = unit % n_kv;
      const int64_t plane = (b * n_kv + kv) * S * D;
      std::memcpy(k_out + plane, cache_k + plane, S * D * sizeof(float));
      std::memcpy(v_out + plane, cache_v + plane, S * D * sizeof(float));
      std::vector<int64_t> js;  // this row's real tokens
      for (int64_t j = 0; j < L; ++j)
        if (packed[b * L + j] >= 0) js.push_back(j);
      const int64_t n = static_cast<int64_t>(js.size());
      if (n == 0) continue;
      for (int64_t j : js) {
        const int64_t r = packed[b * L + j];
        const float *cb = cos + (b * L + j) * D, *sb = sin + (b * L + j) * D;
        float *kr = k + r * nk + kv * D, *vr = v + r * nk + kv * D;
        for (int64_t e = 0; e < D; ++e) {
          kr[e] += bk[kv * D + e];
          vr[e] += bv[kv * D + e];
        }
        rope(kr, cb, sb, D);
        std::memcpy(k_out + plane + (w0 + j) * D, kr, D * sizeof(float));
        std::memcpy(v_out + plane + (w0 + j) * D, vr, D * sizeof(float));
      }
      // queries of the group's heads, head-major: row (rep * n + i) is head kv * n_rep + rep of token js[i]
      const int64_t nr = n_rep * n;
      qt.resize(nr * D);
      scores.resize(nr * span);
      ot.resize(nr * D);
      for (int64_t rep = 0; rep < n_rep; ++rep) {
        const int64_t head = kv * n_rep + rep;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t j = js[i], r = packed[b * L + j];
          float *qr = qt.data() + (rep * n + i) * D;
          for (int64_t e = 0; e < D; ++e) qr[e] = q[r * nq + head * D + e] + bq[head * D + e];
          rope(qr, cos + (b * L + j) * D, sin + (b * L + j) * D, D);
        }
      }
      const float *keys = k_out + plane, *values = v_out + plane, *mask = key_mask + b * S;
      msdfkd::g_sgemm('N', 'T', nr, span, D, scale, qt.data(), D, keys, D, 0.0f, scores.data(), span);
      for (int64_t row = 0; row < nr; ++row) {
        const int64_t last = w0 + js[row % n];  // the token's own slot
        float *sr = scores.data() + row * span;
        float top = -INFINITY;
        for (int64_t s = 0; s <= last; ++s)
          if (mask[s] > 0.0f) top = std::max(top, sr[s]);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t s = 0; s < span; ++s) {
          const bool readable = s <= last && mask[s] > 0.0f;
          const float w = readable ? msdfkd::exp_nonpositive(std::min(sr[s] - top, 0.0f)) : 0.0f;
          sr[s] = w;
          total += w;
        }
        for (int64_t s = 0; s <= last; ++s) sr[s] /= total;
      }
      msdfkd::g_sgemm('N', 'N', nr, D, span, 1.0f, scores.data(), span, values, D, 0.0f, ot.data(), D);
      for (int64_t rep = 0; rep < n_rep; ++rep) {
        const int64_t head = kv * n_rep + rep;
        for (int64_t i = 0; i < n; ++i)
          std::memcpy(attn + packed[b * L + js[i]] * nq + head * D, ot.data() + (rep * n + i) * D,
                      D * sizeof(float));
      }
    }
    team.wait();
    split_range(H, p, np, b0, b1);
    project(attn, wo, o, R, H, nq, b0, b1);
    team.wait();
    split_range(R, p, np, b0, b1);
    for (int64_t i = b0 * H; i < b1 * H; ++i) x1[i] = xp[i] + o[i];
    rms_norm(x1 + b0 * H, post_norm, eps, h2 + b0 * H, b1 - b0, H);
    team.wait();
    split_range(I, p, np, b0, b1);
    swiglu(h2, w_gate, w_up, g, u, R, I, H, b0, b1);
    team.wait();
    split_range(H, p, np, b0, b1);
    project(g, w_down, d, R, H, I, b0, b1);
    for (int64_t r = 0; r < R; ++r)
      for (int64_t j = b0; j < b1; ++j) x_out[token[r] * H + j] = x1[r * H + j] + d[r * H + j];
  });
  return 0;
}

}  // extern "C"
