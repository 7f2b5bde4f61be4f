"""kernels.adam_weight_decay: the cpu path's in-place C++ update against MindSpore's own AdamWeightDecay (the
same float32 values, bit for bit, over several steps, with learning-rate schedules, parameter groups and the
decay filter) and against a float64 numpy update; which path runs, and what it refuses."""
import logging

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops

from kernels import adamw, set_kernel_backend

pytestmark = pytest.mark.usefixtures("clean_kernel_dispatch")

SHAPES = {"embedding": (3001, 48), "dense": (96, 48), "LayerNorm.gamma": (48,), "odd": (7,)}


def _params(seed):
    rng = np.random.default_rng(seed)
    return [Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=name)
            for name, shape in SHAPES.items()]


def _train(make_optimizer, steps, seed=0):
    """Run `steps` updates of a quadratic loss (a different scale per parameter, so every gradient differs);
    returns the parameters and both moments as numpy arrays."""
    params = _params(seed)
    opt = make_optimizer(params)
    scales = [0.5, 1.0, 1.5, 2.0]

    def loss():
        return sum((p * p).sum() * s for p, s in zip(params, scales))

    grad_fn = ms.value_and_grad(loss, None, opt.parameters)

    @ms.jit
    def step():
        value, grads = grad_fn()
        return ops.depend(value, opt(grads))

    for _ in range(steps):
        step()
    return [t.asnumpy().copy() for t in (*params, *opt.moments1, *opt.moments2)]


@pytest.mark.parametrize("kind", ["constant", "schedule", "groups"])
def test_cpu_update_is_mindspores_adamw_to_the_bit(kind):
    ms.set_context(mode=ms.GRAPH_MODE)

    def make(cls):
        def build(params):
            if kind == "constant":
                return cls(params, learning_rate=1e-2, weight_decay=0.01)
            if kind == "schedule":
                return cls(params, learning_rate=[1e-2 * (1 - i / 10) for i in range(10)], weight_decay=0.01)
            return cls([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}],
                       learning_rate=1e-2, weight_decay=0.05)
        return build

    want = _train(make(nn.AdamWeightDecay), 6)
    got = _train(make(adamw.CpuAdamWeightDecay), 6)
    start = _params(0)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.tobytes() == w.tobytes(), f"array {i}: max difference {np.abs(g - w).max()}"
    assert not np.array_equal(got[0], start[0].asnumpy())  # the parameters did move


def test_cpu_update_matches_a_float64_update():
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(3)
    p0, m0 = rng.standard_normal(5000).astype(np.float32), (rng.standard_normal(5000) * 0.1).astype(np.float32)
    v0, g = (rng.random(5000) * 0.01).astype(np.float32), (rng.standard_normal(5000) * 0.3).astype(np.float32)
    p = Parameter(Tensor(p0.copy()), name="w")
    opt = adamw.CpuAdamWeightDecay([p], learning_rate=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)
    opt.moments1[0].set_data(Tensor(m0.copy()))
    opt.moments2[0].set_data(Tensor(v0.copy()))
    update = ms.jit(opt.construct)
    update((Tensor(g),))
    want = adamw.reference_update(p0, m0, v0, g, 1e-2, 0.8, 0.99, 1e-6, 0.1)
    for got, ref in zip((p, opt.moments1[0], opt.moments2[0]), want):
        # float32 roundings of operands of order 1 (m = 0.8 m + 0.2 g can cancel to near 0)
        np.testing.assert_allclose(got.asnumpy(), ref, rtol=2e-6, atol=3e-7)


def test_the_cpu_path_is_the_default_on_cpu_and_composite_when_asked_for(caplog):
    caplog.set_level(logging.INFO, logger="kernels")
    assert isinstance(adamw.adam_weight_decay(_params(0), 1e-3), adamw.CpuAdamWeightDecay)
    set_kernel_backend("composite")
    opt = adamw.adam_weight_decay(_params(0), 1e-3)
    assert type(opt) is nn.AdamWeightDecay
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("adamw")]
    assert lines == ["adamw: running the cpu path (chosen by device target CPU)",
                     "adamw: running the composite path (chosen by set_kernel_backend)"]


def test_the_cpu_update_refuses_other_dtypes_by_name():
    p = Parameter(Tensor(np.zeros(4, np.float16)), name="half")
    with pytest.raises(ValueError, match="the cpu AdamW updates float32 parameters; half is Float16"):
        adamw.CpuAdamWeightDecay([p], 1e-3)


def test_the_backward_reads_each_weight_before_its_update():
    """In h2 = tanh(tanh(x W0) W1), the backward reads W1 for the gradient of W0 in an op of its own, apart
    from W1's gradient: an update of W1 in place must wait for it (the op declares its writes as MindSpore's
    AdamWeightDecay does). Eight steps, the same values to the bit as MindSpore's optimizer."""
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((64, 256)).astype(np.float32))
    weights = [rng.standard_normal(shape).astype(np.float32) * 0.05 for shape in ((256, 512), (512, 256), (256, 8))]
    results = []
    for cls in (nn.AdamWeightDecay, adamw.CpuAdamWeightDecay):
        params = [Parameter(Tensor(w.copy()), name=f"w{i}") for i, w in enumerate(weights)]
        opt = cls(params, learning_rate=0.05, weight_decay=0.01)

        def loss():
            h = ops.tanh(ops.matmul(x, params[0]))
            h = ops.tanh(ops.matmul(h, params[1]))
            return (ops.matmul(h, params[2]) ** 2).sum()

        grad_fn = ms.value_and_grad(loss, None, opt.parameters)

        @ms.jit
        def step():
            value, grads = grad_fn()
            return ops.depend(value, opt(grads))

        losses = [float(step().asnumpy()) for _ in range(8)]
        results.append((losses, [p.asnumpy().copy() for p in params]))
    (want_losses, want), (got_losses, got) = results
    assert got_losses == want_losses
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()
