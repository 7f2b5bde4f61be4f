"""AdamW as MindSpore's ``nn.AdamWeightDecay`` computes it, with each parameter's update as one C++ op on CPU:
``adam_weight_decay(params, learning_rate, weight_decay)``, the same arguments as ``nn.AdamWeightDecay``.

    m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2,   p -= lr (m / (sqrt(v) + eps) + decay p)
(no bias correction, as MindSpore's AdamWeightDecay; decay is 0 for the parameters its decay filter leaves out).

Paths (``kernels.dispatch.resolve_encoder_path("adamw")``, logged once when an optimizer is built):
    cpu        on the CPU device target: kernels/cpu/adamw.cc updates a parameter and its two moments where
               they are, in the float32 results of MindSpore's own CPU kernel to the bit. That kernel
               vectorises for AVX-512 only and runs a scalar loop elsewhere (45-60 ms for a student's 17M
               values on an AVX2 machine); this one vectorises for AVX2.
    composite  ``nn.AdamWeightDecay`` itself (other device targets, or when asked for by name).
The optimizer's state (its ``adam_m.*`` and ``adam_v.*`` moments, its global step) is nn.AdamWeightDecay's
on both paths, so checkpoints do not depend on the path. ``reference_update`` is the float64 numpy update
(tests).
"""
import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F

from kernels import dispatch


def adam_weight_decay(params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0):
    """``nn.AdamWeightDecay(params, ...)``, whose update runs the C++ kernel on the cpu path."""
    if dispatch.resolve_encoder_path("adamw") == "cpu":
        return CpuAdamWeightDecay(params, learning_rate, beta1, beta2, eps, weight_decay)
    return nn.AdamWeightDecay(params, learning_rate, beta1, beta2, eps, weight_decay)


_cpu_update = C.MultitypeFuncGraph("cpu_adam_weight_decay")


@_cpu_update.register("Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor", "Bool", "Bool")
def _update_one(update_op, beta1, beta2, eps, lr, weight_decay, param, m, v, gradient, decay_flag, optim_filter):
    if optim_filter:
        decay = weight_decay if decay_flag else weight_decay * 0.0
        f32 = ms.float32
        hyper = ops.concat((lr.reshape(1).astype(f32), beta1.astype(f32), beta2.astype(f32), eps.astype(f32),
                            decay.reshape(1).astype(f32)))
        return update_op(param, m, v, gradient.astype(f32), hyper)
    return True


class CpuAdamWeightDecay(nn.AdamWeightDecay):
    """nn.AdamWeightDecay (its parameters, groups, learning-rate schedules and state) whose update is
    kernels/cpu/adamw.cc: float32 parameters only."""

    def __init__(self, params, learning_rate=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0):
        super().__init__(params, learning_rate, beta1, beta2, eps, weight_decay)
        for p in self._parameters:
            if p.dtype != ms.float32:
                raise ValueError(f"the cpu AdamW updates float32 parameters; {p.name} is {p.dtype}")
        from kernels import cpu_ops
        self.update_op = cpu_ops.adamw_update_op()

    def construct(self, gradients):
        weight_decay = self.get_weight_decay()
        lr = self.get_lr()
        self.assignadd(self.global_step, self.global_step_increase_tensor)
        if self.is_group:
            if self.is_group_lr:
                return self.hyper_map(F.partial(_cpu_update, self.update_op, self.beta1, self.beta2, self.eps),
                                      lr, weight_decay, self._parameters, self.moments1, self.moments2,
                                      gradients, self.decay_flags, self.optim_filter)
            return self.hyper_map(F.partial(_cpu_update, self.update_op, self.beta1, self.beta2, self.eps, lr),
                                  weight_decay, self._parameters, self.moments1, self.moments2, gradients,
                                  self.decay_flags, self.optim_filter)
        return self.hyper_map(F.partial(_cpu_update, self.update_op, self.beta1, self.beta2, self.eps, lr,
                                        weight_decay), self._parameters, self.moments1, self.moments2, gradients,
                              self.decay_flags, self.optim_filter)


def reference_update(param, m, v, grad, lr, beta1, beta2, eps, decay):
    """One update in float64: (param, m, v)."""
    p, m, v, g = (np.asarray(a, np.float64) for a in (param, m, v, grad))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    return p - lr * (m / (np.sqrt(v) + eps) + decay * p), m, v
