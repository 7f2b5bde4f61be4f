"""Compile the Triton kernels ahead of time into cubins and write the C header the aot launcher embeds.

    python -m kernels.aot_build --arch 90 --out kernels/build

Needs no GPU: triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)) runs ptxas on this
machine. Run in a process where TRITON_INTERPRET is unset (the compiler, not the interpreter, must own
the @triton.jit decorators). scripts/build_kernels.sh calls this, then nvcc on kernels/aot/launcher.cu.
"""
import argparse
import os
import pathlib
import re

LOGIT_DTYPES = ("fp32", "fp16", "bf16")


def kernel_specs(k):
    """(kernel name, variant, fn, signature, constexprs) for every cubin the launcher needs."""
    se_blocks = {"BLOCK_M": k.SE_BLOCK_M, "BLOCK_V": k.SE_BLOCK_V, "BLOCK_H": k.SE_BLOCK_H}
    specs = []
    for dt in LOGIT_DTYPES:
        ptr_l = "*" + dt
        specs.append(("se_forward_kernel", dt, k.se_forward_kernel, _sig(
            k.se_forward_kernel, {"logits_ptr": ptr_l, "t0_ptr": "*fp32", "t1_ptr": "*fp32", "ids_ptr": "*i32",
                                  "seed_ptr": "*i64", "tau_ptr": "*fp32", "row_offset_ptr": "*i64",
                                  "soft_ptr": "*fp32", "hard_ptr": "*fp32", "lse_ptr": "*fp32", "k_ptr": "*i32"}),
            se_blocks))
        specs.append(("se_backward_logits_kernel", dt, k.se_backward_logits_kernel, _sig(
            k.se_backward_logits_kernel, {"logits_ptr": ptr_l, "t0_ptr": "*fp32", "t1_ptr": "*fp32",
                                          "seed_ptr": "*i64", "tau_ptr": "*fp32", "row_offset_ptr": "*i64",
                                          "lse_ptr": "*fp32", "soft_ptr": "*fp32", "dout_ptr": "*fp32",
                                          "dlogits_ptr": ptr_l}), se_blocks))
        specs.append(("se_backward_table_kernel", dt, k.se_backward_table_kernel, _sig(
            k.se_backward_table_kernel, {"logits_ptr": ptr_l, "seed_ptr": "*i64", "tau_ptr": "*fp32",
                                         "row_offset_ptr": "*i64", "lse_ptr": "*fp32", "dout_ptr": "*fp32",
                                         "dtable_ptr": "*fp32"}), se_blocks))
        specs.append(("kd_forward_kernel", dt, k.kd_forward_kernel, _sig(
            k.kd_forward_kernel, {"s_ptr": ptr_l, "t_ptr": ptr_l, "temp_ptr": "*fp32", "loss_ptr": "*fp32",
                                  "lse_s_ptr": "*fp32", "lse_t_ptr": "*fp32"}), {"BLOCK": k.KD_BLOCK}))
        specs.append(("kd_backward_kernel", dt, k.kd_backward_kernel, _sig(
            k.kd_backward_kernel, {"s_ptr": ptr_l, "t_ptr": ptr_l, "temp_ptr": "*fp32", "lse_s_ptr": "*fp32",
                                   "lse_t_ptr": "*fp32", "loss_ptr": "*fp32", "dloss_ptr": "*fp32",
                                   "ds_ptr": ptr_l, "dt_ptr": ptr_l}), {"BLOCK": k.KD_BLOCK}))
    specs.append(("gumbel_kernel", "fp32", k.gumbel_kernel, _sig(
        k.gumbel_kernel, {"seed_ptr": "*i64", "row_offset_ptr": "*i64", "out_ptr": "*fp32", "u_ptr": "*fp32"}),
        {"BLOCK_M": k.SE_BLOCK_M, "BLOCK_V": k.SE_BLOCK_V}))
    for accumulate in (0, 1):
        specs.append(("matmul_kernel", f"acc{accumulate}", k.matmul_kernel, _sig(
            k.matmul_kernel, {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}),
            {"ACCUMULATE": accumulate, "BLOCK_M": k.MM_BLOCK_M, "BLOCK_N": k.MM_BLOCK_N, "BLOCK_K": k.MM_BLOCK_K}))
    return specs


def _sig(fn, pointers):
    """Full signature: the given pointer types, "constexpr" for constexpr args, i32 for every other int."""
    sig = {}
    for param in fn.params:
        if param.name in pointers:
            sig[param.name] = pointers[param.name]
        elif param.is_constexpr:
            sig[param.name] = "constexpr"
        else:
            sig[param.name] = "i32"
    return sig


def compile_all(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    from kernels import triton_kernels as k

    compiled = []
    for name, variant, fn, signature, constexprs in kernel_specs(k):
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                target=GPUTarget("cuda", arch, 32))
        meta = kernel.metadata
        n_args = sum(1 for v in signature.values() if v != "constexpr")
        entry = re.search(r"\.entry\s+\w+\((.*?)\)", kernel.asm["ptx"], re.S).group(1)
        n_params = entry.count(".param")
        n_scratch = n_params - n_args
        if n_scratch not in (0, 1, 2):
            raise RuntimeError(f"{name}[{variant}]: {n_params} PTX parameters for {n_args} arguments")
        if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
            raise RuntimeError(f"{name}[{variant}] needs global scratch memory, which the launcher does not provide")
        compiled.append({"name": meta.name, "variant": variant, "cubin": kernel.asm["cubin"],
                         "num_warps": meta.num_warps, "shared": meta.shared, "n_scratch": n_scratch})
    return compiled, k


def write_header(compiled, k, path, arch):
    lines = [f"// Generated by kernels/aot_build.py for sm_{arch}; do not edit.",
             "#pragma once", "#include <cstddef>", "",
             f"#define SE_BLOCK_M {k.SE_BLOCK_M}", f"#define SE_BLOCK_V {k.SE_BLOCK_V}",
             f"#define SE_BLOCK_H {k.SE_BLOCK_H}", f"#define KD_BLOCK {k.KD_BLOCK}",
             f"#define MM_BLOCK_M {k.MM_BLOCK_M}", f"#define MM_BLOCK_N {k.MM_BLOCK_N}",
             f"#define FUSED_ROWS {k.FUSED_ROWS}", f"#define AOT_ARCH {arch}", ""]
    for i, c in enumerate(compiled):
        data = ",".join(str(b) for b in c["cubin"])
        lines.append(f"static const unsigned char kCubin{i}[] = {{{data}}};")
    lines += ["", "struct AotKernel { const char *name; const char *variant; const unsigned char *cubin; "
              "size_t size; int num_warps; int shared; int n_scratch; };",
              "static const AotKernel kAotKernels[] = {"]
    for i, c in enumerate(compiled):
        lines.append(f'  {{"{c["name"]}", "{c["variant"]}", kCubin{i}, sizeof(kCubin{i}), {c["num_warps"]}, '
                     f'{c["shared"]}, {c["n_scratch"]}}},')
    lines += ["};", f"static const int kNumAotKernels = {len(compiled)};", ""]
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = sm_90)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("build")))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compiled, k = compile_all(args.arch)
    write_header(compiled, k, out / "aot_kernels.h", args.arch)
    for c in compiled:
        print(f"{c['name']:28s} {c['variant']:5s} cubin {len(c['cubin']):7d} B  warps {c['num_warps']}  "
              f"shared {c['shared']:6d} B  scratch params {c['n_scratch']}")
    print(f"wrote {out / 'aot_kernels.h'} ({len(compiled)} kernels, sm_{args.arch})")


if __name__ == "__main__":
    main()
