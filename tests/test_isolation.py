"""conftest.py gives every test back the process-wide settings it started with: MindSpore's execution mode
and kernels' backend override. Without that, a test meant to run eagerly ran as a graph in a full run
(or the reverse), depending on which test or shared fixture ran before it."""
import mindspore as ms

from kernels import dispatch, set_kernel_backend


def test_a_test_changes_the_mode_and_the_kernels_backend():
    ms.set_context(mode=ms.GRAPH_MODE if ms.get_context("mode") == ms.PYNATIVE_MODE else ms.PYNATIVE_MODE)
    set_kernel_backend("composite")


def test_the_next_test_starts_as_the_module_did():
    # nothing in this module sets a mode for its tests, so each starts in MindSpore's default, PyNative
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
    assert dispatch._override is None


def test_the_shared_fixtures_leave_the_mode_as_they_found_it(smoke_one_round_run):
    # the shared teacher and run are made through the command and the driver, both in graph mode
    assert (smoke_one_round_run / "checkpoint.safetensors").is_file()
    assert ms.get_context("mode") == ms.PYNATIVE_MODE
