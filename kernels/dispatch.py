"""Which implementation of the fused ops runs: chosen by device, overridable, logged once.

Paths:
    composite         MindSpore ops in [rows, V] slabs, no N x V temporary (default on CPU and Ascend)
    aot               the Triton kernels compiled ahead of time into an ``aot`` custom op (default on GPU;
                      needs scripts/build_kernels.sh to have been run)
    triton_interpret  the same Triton kernels run by Triton's interpreter on CPU through a ``pyfunc``
                      custom op (slow; for tests and for checking the kernels without a GPU)
    triton            the Triton kernels on whatever runs them here: ``aot`` on GPU, ``triton_interpret``
                      elsewhere

Order of precedence: ``set_kernel_backend(name)``, then the environment variable MS_DFKD_KERNELS, then
the device target. A path that was asked for but cannot run raises; nothing falls back silently.

The encoder ops (gelu, layer_norm, linear), and the Gumbel noise that the composite soft embedding draws
(gumbel_noise), have two paths of their own: ``cpu``, C++ kernels built on first use
(the default on the CPU device target, whatever path the fused ops take), and ``composite``, MindSpore's
own ops (elsewhere, or when ``composite`` is asked for). Where the cpu kernels cannot be built or
loaded, the encoder ops run the composite path and say so in a warning, with the reason.

Every path module has the same entry points with the same arguments, so an op runs as
    path_module(resolve_backend(op), op).<op>(args...)
    soft_embedding(logits, tables, seed, tau, hard, ids, row_offset, grad_tables)
    fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard, ids, row_offset)
    kd_loss_rows(student, teacher, temperature)              (kd_loss_op reduces the rows)
    gelu(x);  layer_norm(x, weight, bias, eps);  linear(x, weight, bias)     (the encoder ops)
The composite soft embedding asks resolve_encoder_path("gumbel_noise") whether its noise comes from
kernels.cpu_ops.gumbel_noise (cpu) or kernels.utils.gumbel (composite): the same values.
kernels.adam_weight_decay asks resolve_encoder_path("adamw") whether its update is kernels/cpu/adamw.cc (cpu)
or nn.AdamWeightDecay's own (composite): the same values.
"""
import functools
import importlib
import logging
import os

from mindspore import ops

logger = logging.getLogger("kernels")

BACKENDS = ("composite", "aot", "triton_interpret", "triton")
ENV_VAR = "MS_DFKD_KERNELS"
OPS = ("soft_embedding", "fused_linear_soft_embedding", "kd_loss")
# the module of each concrete path that holds an op's entry point
_PATH_MODULES = {
    "composite": {"soft_embedding": "kernels.soft_embedding_composite",
                  "fused_linear_soft_embedding": "kernels.soft_embedding_composite",
                  "kd_loss": "kernels.kd_loss_composite"},
    "triton_interpret": dict.fromkeys(OPS, "kernels.triton_ops"),
    "aot": dict.fromkeys(OPS, "kernels.aot_ops"),
}
ENCODER_OPS = ("gelu", "layer_norm", "linear")
_PATH_MODULES["composite"].update(dict.fromkeys(ENCODER_OPS, "kernels.encoder_ops_composite"))
_PATH_MODULES["cpu"] = dict.fromkeys(ENCODER_OPS, "kernels.cpu_ops")

_override = None
_logged = set()


def set_kernel_backend(name):
    """Force a path for every op (None or "auto" returns to the environment variable / device default)."""
    global _override
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS} or 'auto'")
    _override = None if name == "auto" else name


def _device_target():
    import mindspore as ms
    return ms.get_context("device_target")


def requested_backend():
    """(name, why) before resolving the 'triton' alias and before checking availability."""
    if _override is not None:
        return _override, "set_kernel_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "auto":
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not a kernel backend; expected one of {BACKENDS} or 'auto'")
        return env, f"{ENV_VAR}={env}"
    target = _device_target()
    return ("aot" if target == "GPU" else "composite"), f"device target {target}"


@ops.constexpr(reuse_result=False)
def resolve_backend(op_name):
    """The concrete path for ``op_name`` (composite | aot | triton_interpret); logged once per op and path.

    A constexpr: in graph mode it runs in Python while the graph compiles, and the graph keeps the
    answer (a graph compiled under one backend keeps it; set the backend before compiling)."""
    name, why = requested_backend()
    if name == "triton":
        name = "aot" if _device_target() == "GPU" else "triton_interpret"
        why = f"{why} (triton on {_device_target()})"
    if name == "aot":
        from kernels import aot_ops
        problem = aot_ops.unavailable_reason()
        if problem:
            raise RuntimeError(f"{op_name}: the aot Triton path was requested ({why}) but cannot run: {problem}. "
                               f"Build it with scripts/build_kernels.sh, or set {ENV_VAR}=composite.")
    if name == "triton_interpret":
        from kernels import triton_runtime
        problem = triton_runtime.interpreter_problem()
        if problem:
            raise RuntimeError(f"{op_name}: the triton_interpret path was requested ({why}) but cannot run: "
                               f"{problem}")
    if (op_name, name) not in _logged:
        _logged.add((op_name, name))
        logger.info("%s: running the %s path (chosen by %s)", op_name, name, why)
    return name


@functools.lru_cache(maxsize=None)
def path_module(path, op_name):
    """The module whose entry point runs ``op_name`` on the concrete ``path`` (from resolve_backend).

    An lru_cache object: graph mode runs it in Python while the graph compiles (its arguments are
    constants), and the importing happens only for the paths that run."""
    return importlib.import_module(_PATH_MODULES[path][op_name])


@ops.constexpr(reuse_result=False)
def resolve_encoder_path(op_name):
    """The path of an encoder op (gelu, layer_norm, linear) or of gumbel_noise: cpu | composite; logged once per
    op and path, as a warning when the cpu kernels cannot run (see the module docstring). A constexpr, like
    resolve_backend."""
    name, why = requested_backend()
    target = _device_target()
    level, message = logging.INFO, "%s: running the %s path (chosen by %s)"
    if name == "composite" and not why.startswith("device target"):  # asked for by name
        path = "composite"
    elif target != "CPU":
        path, why = "composite", f"device target {target}"
    else:
        from kernels import cpu_ops
        problem = cpu_ops.unavailable_reason(op_name)
        path, why = ("composite", f"the cpu kernels cannot run here: {problem}") if problem else \
            ("cpu", "device target CPU")
        if problem:
            level, message = logging.WARNING, "%s: running the %s path (%s)"
    if (op_name, path) not in _logged:
        _logged.add((op_name, path))
        logger.log(level, message, op_name, path, why)
    return path
