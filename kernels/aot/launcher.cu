// MindSpore `aot` custom-op entry points for the ahead-of-time compiled Triton kernels of ms-dfkd.
//
// Every entry point has MindSpore's aot C ABI
//   int Name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
//            void *stream, void *extra)
// with params = inputs then outputs (device pointers). The cubins come from kernels/aot_build.py
// (aot_kernels.h, generated); they are loaded once with the CUDA driver API and launched on
// MindSpore's stream. The launch sequence of each op mirrors kernels/triton_runtime.py call for call.
// Triton >= 3.3 kernels take trailing scratch pointers (global / profile scratch); the build checked
// that none of ours needs scratch memory, so they get null pointers. Returns 0 on success, else a
// nonzero code (and prints why to stderr).
//
// The driver library is opened with dlopen at the first call rather than linked: the build machine
// needs no libcuda, and the .so loads (for inspection) on machines without a GPU.
#include <cuda.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "aot_kernels.h"

namespace {

struct Driver {
  CUresult (*Init)(unsigned int);
  CUresult (*DeviceGet)(CUdevice *, int);
  CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
  CUresult (*CtxGetCurrent)(CUcontext *);
  CUresult (*CtxSetCurrent)(CUcontext);
  CUresult (*ModuleLoadData)(CUmodule *, const void *);
  CUresult (*ModuleGetFunction)(CUfunction *, CUmodule, const char *);
  CUresult (*FuncSetAttribute)(CUfunction, CUfunction_attribute, int);
  CUresult (*LaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                           CUstream, void **, void **);
  CUresult (*GetErrorString)(CUresult, const char **);
};

template <typename F>
bool resolve(void *lib, const char *name, F *fn) {
  *fn = reinterpret_cast<F>(dlsym(lib, name));
  if (*fn == nullptr) fprintf(stderr, "kernels/aot: libcuda.so.1 has no %s\n", name);
  return *fn != nullptr;
}

const Driver *driver() {
  static Driver d;
  static int state = 0;  // 0 not tried, 1 ready, -1 failed
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  if (state != 0) return state == 1 ? &d : nullptr;
  state = -1;
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    fprintf(stderr, "kernels/aot: cannot open libcuda.so.1: %s\n", dlerror());
    return nullptr;
  }
  bool ok = resolve(lib, "cuInit", &d.Init) && resolve(lib, "cuDeviceGet", &d.DeviceGet) &&
            resolve(lib, "cuDevicePrimaryCtxRetain", &d.DevicePrimaryCtxRetain) &&
            resolve(lib, "cuCtxGetCurrent", &d.CtxGetCurrent) && resolve(lib, "cuCtxSetCurrent", &d.CtxSetCurrent) &&
            resolve(lib, "cuModuleLoadData", &d.ModuleLoadData) &&
            resolve(lib, "cuModuleGetFunction", &d.ModuleGetFunction) &&
            resolve(lib, "cuFuncSetAttribute", &d.FuncSetAttribute) &&
            resolve(lib, "cuLaunchKernel", &d.LaunchKernel) && resolve(lib, "cuGetErrorString", &d.GetErrorString);
  if (ok) state = 1;
  return ok ? &d : nullptr;
}

struct Loaded {
  bool done = false;
  CUfunction fn = nullptr;
};
Loaded g_loaded[kNumAotKernels];
std::mutex g_mutex;

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

bool check(CUresult r, const char *what) {
  if (r == CUDA_SUCCESS) return true;
  const char *msg = nullptr;
  driver()->GetErrorString(r, &msg);
  fprintf(stderr, "kernels/aot: %s failed: %s\n", what, msg ? msg : "unknown error");
  return false;
}

// The launcher runs on MindSpore's thread, where the CUDA runtime has made the primary context
// current; if nothing is current (driver API used first), make device 0's primary context current.
bool ensure_context() {
  const Driver *drv = driver();
  if (drv == nullptr) return false;
  CUcontext ctx = nullptr;
  if (drv->CtxGetCurrent(&ctx) == CUDA_SUCCESS && ctx != nullptr) return true;
  CUdevice dev;
  if (!check(drv->Init(0), "cuInit") || !check(drv->DeviceGet(&dev, 0), "cuDeviceGet")) return false;
  if (!check(drv->DevicePrimaryCtxRetain(&ctx, dev), "cuDevicePrimaryCtxRetain")) return false;
  return check(drv->CtxSetCurrent(ctx), "cuCtxSetCurrent");
}

int find_kernel(const char *name, const char *variant) {
  for (int i = 0; i < kNumAotKernels; ++i) {
    if (strcmp(kAotKernels[i].name, name) == 0 && strcmp(kAotKernels[i].variant, variant) == 0) return i;
  }
  fprintf(stderr, "kernels/aot: no cubin for %s [%s]\n", name, variant);
  return -1;
}

CUfunction load(int idx) {
  std::lock_guard<std::mutex> lock(g_mutex);
  Loaded &slot = g_loaded[idx];
  if (slot.done) return slot.fn;
  const AotKernel &k = kAotKernels[idx];
  CUmodule module;
  CUfunction fn;
  if (!ensure_context()) return nullptr;
  const Driver *drv = driver();
  if (!check(drv->ModuleLoadData(&module, k.cubin), "cuModuleLoadData") ||
      !check(drv->ModuleGetFunction(&fn, module, k.name), "cuModuleGetFunction")) {
    return nullptr;
  }
  if (k.shared > 49152 &&
      !check(drv->FuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.shared),
             "cuFuncSetAttribute(max dynamic shared memory)")) {
    return nullptr;
  }
  slot.fn = fn;
  slot.done = true;
  return fn;
}

// Kernel arguments: cuLaunchKernel takes an array of pointers to the argument values.
struct Args {
  CUdeviceptr ptrs[32];
  int32_t ints[32];
  void *slots[64];
  int n = 0, np = 0, ni = 0;
  Args &ptr(const void *p, int64_t byte_offset = 0) {
    ptrs[np] = reinterpret_cast<CUdeviceptr>(p) + byte_offset;
    slots[n++] = &ptrs[np++];
    return *this;
  }
  Args &i32(int64_t v) {
    ints[ni] = static_cast<int32_t>(v);
    slots[n++] = &ints[ni++];
    return *this;
  }
};

int launch(const char *name, const char *variant, int gx, int gy, Args args, void *stream) {
  if (gx == 0 || gy == 0) return 0;
  int idx = find_kernel(name, variant);
  if (idx < 0) return 2;
  CUfunction fn = load(idx);
  if (fn == nullptr) return 3;
  const AotKernel &k = kAotKernels[idx];
  for (int i = 0; i < k.n_scratch; ++i) args.ptr(nullptr);
  CUresult r = driver()->LaunchKernel(fn, gx, gy, 1, 32 * k.num_warps, 1, 1, k.shared, static_cast<CUstream>(stream),
                              args.slots, nullptr);
  return check(r, name) ? 0 : 4;
}

// MindSpore's dtype names -> the cubin variant of the logits dtype.
const char *variant_of(const char *dtype) {
  if (strcmp(dtype, "float32") == 0 || strcmp(dtype, "float") == 0) return "fp32";
  if (strcmp(dtype, "float16") == 0 || strcmp(dtype, "half") == 0) return "fp16";
  if (strcmp(dtype, "bfloat16") == 0 || strcmp(dtype, "bf16") == 0) return "bf16";
  fprintf(stderr, "kernels/aot: unsupported logits dtype %s\n", dtype);
  return nullptr;
}

// Soft-embedding forward over rows [row_base, row_base + n) of a logits block with row stride ldl.
int se_forward(const char *variant, const void *logits, int64_t n, int64_t vocab, int64_t ldl, const void *t0,
               const void *t1, int64_t h0, int64_t h1, const void *ids, const void *seed, const void *tau,
               const void *row_offset, void *soft, void *hard, void *lse, void *k, int64_t row_base, void *stream) {
  Args a;
  a.ptr(logits).ptr(t0).ptr(t1).ptr(ids, 4 * row_base).ptr(seed).ptr(tau).ptr(row_offset);
  a.ptr(soft, 4 * row_base * (h0 + h1)).ptr(hard, 4 * row_base * (h0 + h1)).ptr(lse, 4 * row_base);
  a.ptr(k, 4 * row_base);
  a.i32(n).i32(vocab).i32(h0).i32(h1).i32(row_base).i32(ldl).i32(h0).i32(h1 > 0 ? h1 : h0).i32(h0 + h1);
  return launch("se_forward_kernel", variant, cdiv(n, SE_BLOCK_M), cdiv(h0, SE_BLOCK_H) + cdiv(h1, SE_BLOCK_H),
                a, stream);
}

int se_backward_logits(const char *variant, const void *logits, void *dlogits, int64_t n, int64_t vocab,
                       int64_t ldl, const void *t0, const void *t1, int64_t h0, int64_t h1, const void *seed,
                       const void *tau, const void *row_offset, const void *lse, const void *soft, const void *dout,
                       int64_t row_base, void *stream) {
  Args a;
  int64_t width = h0 + h1;
  a.ptr(logits).ptr(t0).ptr(t1).ptr(seed).ptr(tau).ptr(row_offset).ptr(lse, 4 * row_base);
  a.ptr(soft, 4 * row_base * width).ptr(dout, 4 * row_base * width).ptr(dlogits);
  a.i32(n).i32(vocab).i32(h0).i32(h1).i32(row_base).i32(ldl).i32(h0).i32(h1 > 0 ? h1 : h0).i32(width).i32(ldl);
  return launch("se_backward_logits_kernel", variant, cdiv(n, SE_BLOCK_M), cdiv(vocab, SE_BLOCK_V), a, stream);
}

// c (+)= a @ b, float32, strides in elements.
int matmul(const void *a, int64_t sam, int64_t sak, const void *b, int64_t sbk, int64_t sbn, void *c, int64_t scm,
           int64_t scn, int64_t m, int64_t n, int64_t k, bool accumulate, void *stream) {
  Args args;
  args.ptr(a).ptr(b).ptr(c).i32(m).i32(n).i32(k).i32(sam).i32(sak).i32(sbk).i32(sbn).i32(scm).i32(scn);
  return launch("matmul_kernel", accumulate ? "acc1" : "acc0", cdiv(m, MM_BLOCK_M), cdiv(n, MM_BLOCK_N), args,
                stream);
}


// ---- the ops; "two" says whether the second table slot holds a table (else it repeats the first) ----

// inputs: logits [N, V], t0 [V, H0], t1 [V, H1], ids [N] int32 (-1: argmax), seed [1] int64, tau [1] f32,
//         row_offset [1] int64;  outputs: soft [N, H], hard [N, H], lse [N], k [N] int32
int se_forward_op(bool two, int nparam, void **params, int64_t **shapes, const char **dtypes, void *stream) {
  const char *variant = variant_of(dtypes[0]);
  if (nparam != 11 || variant == nullptr) return 1;
  int64_t n = shapes[0][0], vocab = shapes[0][1], h0 = shapes[1][1], h1 = two ? shapes[2][1] : 0;
  return se_forward(variant, params[0], n, vocab, vocab, params[1], params[2], h0, h1, params[3], params[4],
                    params[5], params[6], params[7], params[8], params[9], params[10], 0, stream);
}

// inputs: logits, t0, t1, seed, tau, row_offset, lse [N], soft [N, H], dout [N, H];  output: dlogits [N, V]
int se_backward_op(bool two, int nparam, void **params, int64_t **shapes, const char **dtypes, void *stream) {
  const char *variant = variant_of(dtypes[0]);
  if (nparam != 10 || variant == nullptr) return 1;
  int64_t n = shapes[0][0], vocab = shapes[0][1], h0 = shapes[1][1], h1 = two ? shapes[2][1] : 0;
  return se_backward_logits(variant, params[0], params[9], n, vocab, vocab, params[1], params[2], h0, h1, params[3],
                            params[4], params[5], params[6], params[7], params[8], 0, stream);
}

// inputs: logits, seed, tau, row_offset, lse, dout [N, H], t0, t1 (for their shapes);
// outputs: dt0 [V, H0], dt1 [V, H1] = y^T @ dout per table (soft mode); dt1 is left untouched without "two"
int se_backward_tables_op(bool two, int nparam, void **params, int64_t **shapes, const char **dtypes,
                          void *stream) {
  const char *variant = variant_of(dtypes[0]);
  if (nparam != 10 || variant == nullptr) return 1;
  int64_t n = shapes[0][0], vocab = shapes[0][1], width = shapes[5][1], col0 = 0;
  for (int t = 0; t < (two ? 2 : 1); ++t) {
    int64_t h = shapes[6 + t][1];
    Args a;
    a.ptr(params[0]).ptr(params[1]).ptr(params[2]).ptr(params[3]).ptr(params[4]).ptr(params[5]).ptr(params[8 + t]);
    a.i32(n).i32(vocab).i32(h).i32(col0).i32(vocab).i32(width).i32(h);
    int rc = launch("se_backward_table_kernel", variant, cdiv(vocab, SE_BLOCK_V), cdiv(h, SE_BLOCK_H), a, stream);
    if (rc != 0) return rc;
    col0 += h;
  }
  return 0;
}

// inputs: hidden [N, Hg] f32, lm_head [V, Hg] f32, t0, t1, ids, seed, tau, row_offset;
// outputs: soft, hard, lse, k, workspace [min(N, FUSED_ROWS), V] f32 (one chunk of logits)
int fused_forward_op(bool two, int nparam, void **params, int64_t **shapes, void *stream) {
  if (nparam != 13) return 1;
  void *hidden = params[0], *lm_head = params[1], *work = params[12];
  int64_t n = shapes[0][0], hg = shapes[0][1], vocab = shapes[1][0], h0 = shapes[2][1], h1 = two ? shapes[3][1] : 0;
  for (int64_t r0 = 0; r0 < n; r0 += FUSED_ROWS) {
    int64_t rows = n - r0 < FUSED_ROWS ? n - r0 : FUSED_ROWS;
    const char *h_chunk = static_cast<const char *>(hidden) + 4 * r0 * hg;
    int rc = matmul(h_chunk, hg, 1, lm_head, 1, hg, work, vocab, 1, rows, vocab, hg, false, stream);
    if (rc == 0) {
      rc = se_forward("fp32", work, rows, vocab, vocab, params[2], params[3], h0, h1, params[4], params[5], params[6],
                      params[7], params[8], params[9], params[10], params[11], r0, stream);
    }
    if (rc != 0) return rc;
  }
  return 0;
}

// inputs: hidden, lm_head, t0, t1, seed, tau, row_offset, lse, soft, dout;
// outputs: dhidden [N, Hg] f32, dlm_head [V, Hg] f32, workspace [min(N, FUSED_ROWS), V] f32
int fused_backward_op(bool two, int nparam, void **params, int64_t **shapes, void *stream) {
  if (nparam != 13) return 1;
  void *hidden = params[0], *lm_head = params[1], *dhidden = params[10], *dlm_head = params[11], *work = params[12];
  int64_t n = shapes[0][0], hg = shapes[0][1], vocab = shapes[1][0], h0 = shapes[2][1], h1 = two ? shapes[3][1] : 0;
  for (int64_t r0 = 0; r0 < n; r0 += FUSED_ROWS) {
    int64_t rows = n - r0 < FUSED_ROWS ? n - r0 : FUSED_ROWS;
    const char *h_chunk = static_cast<const char *>(hidden) + 4 * r0 * hg;
    char *dh_chunk = static_cast<char *>(dhidden) + 4 * r0 * hg;
    // the chunk's logits, then their gradient written over them, then dhidden and dlm_head from it
    int rc = matmul(h_chunk, hg, 1, lm_head, 1, hg, work, vocab, 1, rows, vocab, hg, false, stream);
    if (rc == 0) {
      rc = se_backward_logits("fp32", work, work, rows, vocab, vocab, params[2], params[3], h0, h1, params[4],
                              params[5], params[6], params[7], params[8], params[9], r0, stream);
    }
    if (rc == 0) rc = matmul(work, vocab, 1, lm_head, hg, 1, dh_chunk, hg, 1, rows, hg, vocab, false, stream);
    if (rc == 0) rc = matmul(work, 1, vocab, h_chunk, hg, 1, dlm_head, hg, 1, vocab, hg, rows, r0 > 0, stream);
    if (rc != 0) return rc;
  }
  return 0;
}

}  // namespace

#define MS_DFKD_AOT(Name) \
  extern "C" int Name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, \
                      void *extra)

MS_DFKD_AOT(MsDfkdSeForward) { return se_forward_op(true, nparam, params, shapes, dtypes, stream); }
MS_DFKD_AOT(MsDfkdSeForwardOneTable) { return se_forward_op(false, nparam, params, shapes, dtypes, stream); }
MS_DFKD_AOT(MsDfkdSeBackward) { return se_backward_op(true, nparam, params, shapes, dtypes, stream); }
MS_DFKD_AOT(MsDfkdSeBackwardOneTable) { return se_backward_op(false, nparam, params, shapes, dtypes, stream); }
MS_DFKD_AOT(MsDfkdSeBackwardTables) { return se_backward_tables_op(true, nparam, params, shapes, dtypes, stream); }
MS_DFKD_AOT(MsDfkdSeBackwardTablesOneTable) {
  return se_backward_tables_op(false, nparam, params, shapes, dtypes, stream);
}
MS_DFKD_AOT(MsDfkdFusedForward) { return fused_forward_op(true, nparam, params, shapes, stream); }
MS_DFKD_AOT(MsDfkdFusedForwardOneTable) { return fused_forward_op(false, nparam, params, shapes, stream); }
MS_DFKD_AOT(MsDfkdFusedBackward) { return fused_backward_op(true, nparam, params, shapes, stream); }
MS_DFKD_AOT(MsDfkdFusedBackwardOneTable) { return fused_backward_op(false, nparam, params, shapes, stream); }

// inputs: student [N, V], teacher [N, V] (same dtype), temperature [1] f32;
// outputs: loss_row [N], lse_s [N], lse_t [N] (f32)
MS_DFKD_AOT(MsDfkdKdForward) {
  const char *variant = variant_of(dtypes[0]);
  if (nparam != 6 || variant == nullptr) return 1;
  int64_t n = shapes[0][0], vocab = shapes[0][1];
  Args a;
  for (int i = 0; i < 6; ++i) a.ptr(params[i]);
  a.i32(vocab).i32(vocab).i32(vocab);
  return launch("kd_forward_kernel", variant, static_cast<int>(n), 1, a, stream);
}

// inputs: student, teacher, temperature, lse_s, lse_t, loss_row, dloss_row [N];  outputs: dstudent, dteacher
MS_DFKD_AOT(MsDfkdKdBackward) {
  const char *variant = variant_of(dtypes[0]);
  if (nparam != 9 || variant == nullptr) return 1;
  int64_t n = shapes[0][0], vocab = shapes[0][1];
  Args a;
  for (int i = 0; i < 9; ++i) a.ptr(params[i]);
  a.i32(vocab).i32(vocab).i32(vocab).i32(vocab).i32(vocab);
  return launch("kd_backward_kernel", variant, static_cast<int>(n), cdiv(vocab, KD_BLOCK), a, stream);
}

// The Gumbel noise alone, for checking it on a GPU against kernels.gumbel_noise.gumbel_np.
// inputs: seed [1] int64, row_offset [1] int64;  outputs: g [N, V] f32, u [N, V] f32
MS_DFKD_AOT(MsDfkdGumbel) {
  if (nparam != 4) return 1;
  int64_t n = shapes[2][0], vocab = shapes[2][1];
  Args a;
  for (int i = 0; i < 4; ++i) a.ptr(params[i]);
  a.i32(n).i32(vocab);
  return launch("gumbel_kernel", "fp32", cdiv(n, SE_BLOCK_M), cdiv(vocab, SE_BLOCK_V), a, stream);
}
