"""Runs tests/test_kernels_triton.py in a fresh process with TRITON_INTERPRET=1 when this process
cannot (triton was already imported, by MindSpore, without it), so that those tests run exactly once
whatever order the suite imports its modules in."""
import os
import pathlib
import subprocess
import sys

import pytest

from kernels import triton_runtime

TRITON_TESTS = pathlib.Path(__file__).with_name("test_kernels_triton.py")


def test_triton_kernel_tests_in_a_fresh_interpreter_process():
    if triton_runtime.interpreter_problem() is None:
        pytest.skip("the Triton interpreter works in this process: test_kernels_triton.py ran here")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(TRITON_TESTS)],
                            cwd=TRITON_TESTS.parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_no_test_module_sets_triton_interpret_for_the_whole_run():
    """TRITON_INTERPRET=1 goes only to the subprocess above: set in os.environ while a module was collected,
    it reached every subprocess of every later test (the msrun jobs, the CLI runs, the aot compile check)."""
    import conftest
    assert os.environ.get("TRITON_INTERPRET") == conftest.TRITON_INTERPRET_AT_START
