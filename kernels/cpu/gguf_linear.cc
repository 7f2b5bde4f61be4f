// y = x W^T with W read from a GGUF file's Q4_1 / Q8_0 blocks (gguf_blocks.h), as a MindSpore `aot` op:
// the LM head of the sampler's decode steps (kernels/cpu_ops.py gguf_linear).
#include <cstdint>

#include "common.h"
#include "gguf_blocks.h"

namespace {
// multiply-adds a thread is worth: starting one costs about what 8M of them take
constexpr int64_t kGrainMacs = int64_t{1} << 23;
}  // namespace

extern "C" {

// the loops of the block products: 0 portable, 1 AVX2, 2 AVX-512; -1 the best this CPU has. 1 (and no
// change) for loops the CPU lacks. The tests run each variant the CPU has.
int MsDfkdGgufSetLoops(int loops) {
  if (loops > msdfkd::best_gguf_loops()) return 1;
  msdfkd::g_gguf_loops = loops < 0 ? -1 : loops;
  return 0;
}

int MsDfkdGgufLoops() { return msdfkd::gguf_loops(); }

int MsDfkdGgufBestLoops() { return msdfkd::best_gguf_loops(); }

// params: x float32 [.., K], blocks uint8 [N, K / 32, 20 (Q4_1) or 34 (Q8_0)] or interleaved [N / 8, K / 32,
// 192 or 288], y float32 [.., N]
int MsDfkdGgufLinear(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                     void *extra) {
  if (nparam != 3 || ndims[1] != 3) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const uint8_t *w = static_cast<const uint8_t *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t block_bytes = shapes[1][2], columns = msdfkd::block_columns(block_bytes);
  const int64_t N = shapes[1][0] * columns, K = shapes[1][1] * msdfkd::kBlockValues;
  if (shapes[0][ndims[0] - 1] != K) return 1;
  int64_t M = 1;
  for (int i = 0; i + 1 < ndims[0]; ++i) M *= shapes[0][i];
  if (!msdfkd::known_block_bytes(block_bytes)) return 1;
  // threads take whole blocks' columns (an interleaved block holds 8)
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, M * K * columns));
  msdfkd::parallel_for(shapes[1][0], grain, [=](int, int64_t begin, int64_t end) {
    msdfkd::gguf_rows(x, w, block_bytes, y, N, M, K, begin * columns, end * columns);
  });
  return 0;
}

}  // extern "C"
