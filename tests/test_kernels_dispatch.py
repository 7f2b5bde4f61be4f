"""Which path kernels/ runs: device default, config and environment overrides, no silent fallback."""
import logging
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from kernels import dispatch, kd_loss, set_kernel_backend


pytestmark = pytest.mark.usefixtures("clean_kernel_dispatch")


def test_cpu_defaults_to_the_composite_and_logs_it_once(caplog):
    assert ms.get_context("device_target") == "CPU"
    s = ms.Tensor(np.zeros((2, 3), np.float32))
    with caplog.at_level(logging.INFO, logger="kernels"):
        kd_loss(s, s, 1.0)
        kd_loss(s, s, 2.0)
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert lines == ["kd_loss: running the composite path (chosen by device target CPU)"]


def test_config_beats_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton_interpret")
    assert dispatch.requested_backend() == ("triton_interpret", "MS_DFKD_KERNELS=triton_interpret")
    set_kernel_backend("composite")
    assert dispatch.resolve_backend("soft_embedding") == "composite"


def test_unknown_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'"):
        set_kernel_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="MS_DFKD_KERNELS='fast'"):
        dispatch.requested_backend()


def test_aot_on_cpu_raises_and_says_why():
    set_kernel_backend("aot")
    with pytest.raises(RuntimeError, match="aot Triton path was requested .* GPU only .* device target is CPU"):
        dispatch.resolve_backend("kd_loss")


def test_triton_on_cpu_means_the_interpreter():
    from kernels import triton_runtime
    set_kernel_backend("triton")
    if triton_runtime.interpreter_problem() is None:
        assert dispatch.resolve_backend("kd_loss") == "triton_interpret"
    else:  # this process imported triton without TRITON_INTERPRET=1
        with pytest.raises(RuntimeError, match="triton_interpret path was requested .* TRITON_INTERPRET=1"):
            dispatch.resolve_backend("kd_loss")


def test_interpreter_requested_without_the_environment_variable_raises():
    """In a process that imported MindSpore (hence triton) without TRITON_INTERPRET=1."""
    code = ("import mindspore, numpy as np\n"
            "from kernels import kd_loss, set_kernel_backend\n"
            "set_kernel_backend('triton_interpret')\n"
            "s = mindspore.Tensor(np.zeros((2, 3), np.float32))\n"
            "try:\n"
            "    kd_loss(s, s, 1.0)\n"
            "except RuntimeError as err:\n"
            "    print('REFUSED', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "REFUSED kd_loss: the triton_interpret path was requested (set_kernel_backend)" in out.stdout, \
        out.stdout + out.stderr[-3000:]
    assert "TRITON_INTERPRET=1" in out.stdout
