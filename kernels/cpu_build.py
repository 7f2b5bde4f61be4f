"""Build the CPU kernel library (kernels/cpu/*.cc: the encoder ops, the sampler's decoder layer,
GGUF-block products, the Gumbel noise, AdamW's update and the sampler's top-p nucleus) with the system's
C++ compiler, on demand.

    python -m kernels.cpu_build            # builds if needed, prints the library's path

The library's name carries a hash of the sources and the compiler flags, so an edited source or another
flag set builds a new file (and removes the old ones) and a stale one is never loaded. Two processes
building at once each write a temporary file and rename it into place: whichever lands last, both are the same library.

Where: MS_DFKD_CPU_KERNELS_DIR, else kernels/build/ beside this file. The compiler: CXX, else g++.
Imports neither MindSpore nor numpy.
"""
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

SOURCE_DIR = pathlib.Path(__file__).with_name("cpu")
SOURCES = tuple(SOURCE_DIR / name
                for name in ("encoder_ops.cc", "llama_decode.cc", "gguf_linear.cc", "gumbel_noise.cc",
                             "adamw.cc", "nucleus.cc"))
HEADERS = (SOURCE_DIR / "common.h", SOURCE_DIR / "gguf_blocks.h")
DIR_ENV = "MS_DFKD_CPU_KERNELS_DIR"
# -fno-trapping-math lets GCC vectorise the branch-free selects of the GELU loops, -fopenmp-simd the
# "omp simd" reductions (no OpenMP runtime); no -march, so the library runs on any CPU of its architecture
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math")
LIBS = ("-ldl",)  # dlopen: the sgemm comes from MindSpore's libdnnl at run time


class BuildError(RuntimeError):
    """The library could not be built here; the message says why."""


def compiler():
    return os.environ.get("CXX") or "g++"


def build_dir():
    return pathlib.Path(os.environ.get(DIR_ENV) or pathlib.Path(__file__).with_name("build")).resolve()


def library_path():
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(text + " ".join((compiler(),) + FLAGS + LIBS).encode()).hexdigest()[:12]
    return build_dir() / f"libdfkd_cpu_{key}.so"


def ensure_built():
    """The library's path, compiled first if it is not there; BuildError if it cannot be."""
    lib = library_path()
    if lib.is_file():
        return lib
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)")
    try:
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".tmp", dir=lib.parent)
        os.close(fd)
    except OSError as e:
        raise BuildError(f"cannot write the library into {lib.parent}: {e.strerror} "
                         f"(set {DIR_ENV} to a writable folder)") from None
    try:
        done = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", tmp, *LIBS], capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise BuildError(f"{cxx} failed on {SOURCE_DIR} (exit {done.returncode}):\n{tail}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in lib.parent.glob("libdfkd_cpu_*.so"):  # built from an earlier source (a process that
        if old != lib:                               # has one loaded keeps its mapping)
            old.unlink(missing_ok=True)
    return lib


def main():
    try:
        print(ensure_built())
    except BuildError as e:
        print(f"kernels.cpu_build: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
