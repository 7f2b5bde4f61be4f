"""Fused ops of ms-dfkd: Gumbel-softmax soft embedding (plain and fused with the LM head) and KD loss; and
the encoder's GELU, LayerNorm and linear layer, with C++ kernels for the CPU.

Each op has a numpy reference (tests only), a chunked MindSpore composite (row slabs; default on CPU and
Ascend), and Triton kernels run either ahead-of-time compiled on GPU (``aot``) or by Triton's
interpreter on CPU (``triton_interpret``). ``set_kernel_backend`` / MS_DFKD_KERNELS pick the path.

The encoder ops (gelu, layer_norm, linear) have a numpy reference, MindSpore's own ops (``composite``) and C++
kernels for the CPU (``cpu``, the default there, built on first use by cpu_build).
``adam_weight_decay`` is nn.AdamWeightDecay whose update is one C++ op per parameter on CPU (kernels.adamw).
``cpu_ops.llama_decode_layer`` runs one decoder layer of the sampler's one-token steps as one C++ op (CPU,
float32, no gradient); its numpy reference is llama_decode_reference.

The public names are imported lazily so that the numpy-only modules (gumbel_noise, the references,
triton_config, triton_runtime, aot_build, cpu_build) load without MindSpore. Graph mode cannot see this lazy
``__getattr__``: code compiled by it imports the names themselves (``from kernels import soft_embedding``).
"""
import importlib

_EXPORTS = {
    "soft_embedding": "kernels.soft_embedding_op",
    "fused_linear_soft_embedding": "kernels.soft_embedding_op",
    "kd_loss": "kernels.kd_loss_op",
    "gelu": "kernels.encoder_ops",
    "layer_norm": "kernels.encoder_ops",
    "linear": "kernels.encoder_ops",
    "set_cpu_threads": "kernels.cpu_ops",
    "adam_weight_decay": "kernels.adamw",
    "set_kernel_backend": "kernels.dispatch",
    "resolve_backend": "kernels.dispatch",
    "requested_backend": "kernels.dispatch",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # a plain attribute from now on (MindSpore's graph parser skips __getattr__)
    return value
