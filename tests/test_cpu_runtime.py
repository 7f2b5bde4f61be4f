"""ms_dfkd.cpu_runtime: MindSpore on CPU without a busy-waiting caller, and the thread count."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ms_dfkd import cli, cpu_runtime
from ms_dfkd.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# The gradient of a 20-layer MLP with an auxiliary output, as ms-dfkd's steps take theirs (about 0.3 s a
# call on 2 cores); the main thread's CPU time while it waits for the results, against the wall time.
# (A plain forward graph does not show the busy wait; this shape of call does.)
_WAIT_PROBE = textwrap.dedent("""
    import os, time
    import numpy as np
    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=ms.GRAPH_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime
    configure_runtime(2)

    class MLP(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layers = nn.CellList([nn.Dense(768, 768) for _ in range(20)])

        def construct(self, x):
            for layer in self.layers:
                x = ops.tanh(layer(x))
            loss = x.sum()
            return loss, loss * 2

    mlp = MLP()
    grad_fn = ms.value_and_grad(mlp, None, mlp.trainable_params(), has_aux=True)

    @ms.jit
    def step(x):
        (loss, *aux), grads = grad_fn(x)
        return loss, aux, grads

    x = ms.Tensor(np.random.default_rng(0).standard_normal((768, 768), dtype=np.float32))
    step(x)[2][-1].asnumpy()  # compiles
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(4):
        step(x)[2][-1].asnumpy()
    print(os.environ["MS_DEV_HOST_BLOCKING_RUN"], time.thread_time() - cpu, time.perf_counter() - wall)
""")


def _probe(value, tmp_path):
    script = tmp_path / "wait_probe.py"  # a file: MindSpore compiles a graph from its function's source
    script.write_text(_WAIT_PROBE)
    env = dict(os.environ, GLOG_v="3", MS_DEV_HOST_BLOCKING_RUN=value,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    setting, cpu, wall = done.stdout.split()[-3:]
    assert setting == value
    return float(cpu) / float(wall)


def test_the_caller_sleeps_while_a_graph_runs(tmp_path):
    # MindSpore's default (0): the caller spins in its queue wait and takes most of a core (0.6-0.7 on a
    # quiet machine, 0.24 beside another test process: a spinner gets a share of a busy core); the control
    # shows the probe sees it
    spinning = _probe("0", tmp_path)
    assert spinning > 0.15, f"the control: the caller's CPU/wall was {spinning:.2f}; expected a busy wait"
    sleeping = _probe("1", tmp_path)
    assert sleeping < min(0.15, spinning / 3), \
        f"with MS_DEV_HOST_BLOCKING_RUN=1 the caller's CPU/wall was {sleeping:.2f} (without: {spinning:.2f})"


def test_configure_runtime_sets_the_variable_and_keeps_the_users(monkeypatch):
    # threads 0 (the cores this process may use): MindSpore takes its pool size once per process, and
    # a smaller one would slow every later test
    monkeypatch.delenv(cpu_runtime.BLOCKING_RUN_ENV, raising=False)
    assert cpu_runtime.configure_runtime(0) == len(os.sched_getaffinity(0))
    assert os.environ[cpu_runtime.BLOCKING_RUN_ENV] == "1"
    monkeypatch.setenv(cpu_runtime.BLOCKING_RUN_ENV, "0")
    assert cpu_runtime.configure_runtime(0) == len(os.sched_getaffinity(0))
    assert os.environ[cpu_runtime.BLOCKING_RUN_ENV] == "0"


def test_the_command_line_sets_it_up_on_cpu(monkeypatch):
    monkeypatch.delenv(cpu_runtime.BLOCKING_RUN_ENV, raising=False)
    cli._mode(load_config(ROOT / "configs" / "smoke.yaml"))
    assert os.environ[cpu_runtime.BLOCKING_RUN_ENV] == "1"


def test_other_device_targets_are_left_alone(monkeypatch):
    import mindspore as ms
    monkeypatch.delenv(cpu_runtime.BLOCKING_RUN_ENV, raising=False)
    monkeypatch.setattr(ms, "get_context", lambda key: "GPU" if key == "device_target" else None)
    assert cpu_runtime.configure_runtime() is None
    assert cpu_runtime.BLOCKING_RUN_ENV not in os.environ


HUGE_PAGES_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from ms_dfkd.cpu_runtime import restart_with_huge_pages
print("start", flush=True)
restart_with_huge_pages()
print("tunables", os.environ.get("GLIBC_TUNABLES"))
"""


@pytest.mark.skipif(not cpu_runtime.huge_pages_usable(), reason="needs Linux, glibc and transparent huge pages not 'never'")
def test_the_program_restarts_once_with_mallocs_huge_pages():
    """The process starts again (its first line printed twice) with the tunable appended to the user's,
    and does not restart a second time; MS_DFKD_HUGE_PAGES=0 keeps it as it is."""
    root = str(ROOT)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MS_DFKD_HUGE_PAGES")}
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHILD, root], capture_output=True, text=True,
                         env=dict(env, GLIBC_TUNABLES="glibc.malloc.arena_max=4"), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["start", "start", "tunables glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"]
    out = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHILD, root], capture_output=True, text=True,
                         env=dict(env, MS_DFKD_HUGE_PAGES="0"), timeout=60)
    assert out.stdout.split("\n")[:2] == ["start", "tunables None"]
