"""Shared pytest set-up. Run the suite from the repo root with `python -m pytest`."""
import os

import pytest

# before any test module is collected: tests/test_kernels_triton_process.py checks that none set it
TRITON_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")

# as ms-dfkd's command line runs MindSpore on CPU (ms_dfkd/cpu_runtime.py, which imports no MindSpore);
# MindSpore reads it at its first op, so it is set before any test module imports MindSpore
from ms_dfkd.cpu_runtime import BLOCKING_RUN_ENV  # noqa: E402

os.environ.setdefault(BLOCKING_RUN_ENV, "1")


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so a bare `pytest -c /dev/null` knows it
    config.addinivalue_line("markers", "real: uses the real pretrained weights from the asset packages")
    config.addinivalue_line("markers", "slow: longer end-to-end runs")


# ------------------------------------------------------------------ isolation of process-wide settings
# MindSpore's execution mode (graph or PyNative) and kernels' backend override are global to the process:
# whatever a test, a module's fixtures or a shared fixture set would otherwise decide how every later test
# runs, so that a test meant to run eagerly ran as a graph in a full run (or the reverse) depending on
# the order. Each test gets back, after it, the settings it started with; each module those it started
# with (a module fixture may set a mode for its own tests); the session fixtures below restore theirs.

def _global_settings():
    import mindspore as ms
    from kernels import dispatch
    return ms.get_context("mode"), dispatch._override


def _restore_global_settings(settings):
    import mindspore as ms
    from kernels import dispatch
    mode, backend = settings
    if ms.get_context("mode") != mode:
        ms.set_context(mode=mode)
    dispatch.set_kernel_backend(backend)


@pytest.fixture(scope="module", autouse=True)
def _module_global_settings():
    settings = _global_settings()
    yield
    _restore_global_settings(settings)


@pytest.fixture(autouse=True)
def _test_global_settings():
    settings = _global_settings()
    yield
    _restore_global_settings(settings)


@pytest.fixture
def clean_kernel_dispatch(monkeypatch):
    """kernels/ at its defaults: no MS_DFKD_KERNELS, no set_kernel_backend, every path not yet logged."""
    from kernels import dispatch
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel_backend(None)
    dispatch._logged.clear()
    yield
    dispatch.set_kernel_backend(None)


@pytest.fixture(scope="session")
def asset_or_skip():
    """asset_or_skip(name): the asset's path, or skip the test when its package is not installed."""
    from ms_dfkd.assets import AssetNotFoundError, asset_path

    def get(name):
        try:
            return asset_path(name)
        except AssetNotFoundError as e:
            pytest.skip(str(e))
    return get


@pytest.fixture(scope="session")
def smoke_teacher(tmp_path_factory):
    """The smoke config's tiny teacher, trained once for the session through the CLI (test_e2e_smoke
    and test_distributed both distil from it; every run only reads it)."""
    from pathlib import Path
    from ms_dfkd.cli import main
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    path = tmp_path_factory.mktemp("teacher") / "tiny_teacher.safetensors"
    settings = _global_settings()
    try:
        assert main(["train-teacher", "--config", str(config), "--teacher.checkpoint", str(path)]) == 0
    finally:
        _restore_global_settings(settings)  # the command set graph mode
    assert path.is_file()
    return str(path)


@pytest.fixture(scope="session")
def smoke_one_round_run(smoke_teacher, tmp_path_factory):
    """A finished 1-round run of the smoke config, shared read-only: a test that changes it works on a copy."""
    import mindspore as ms
    from pathlib import Path
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.train import Distiller
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    out = tmp_path_factory.mktemp("one_round") / "run"
    cfg = load_config(config, parse_overrides(["--teacher.checkpoint", smoke_teacher, "--run.out_dir", str(out),
                                               "--run.rounds", "1"]))
    settings = _global_settings()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        assert Distiller(cfg).run() is not None
    finally:
        _restore_global_settings(settings)
    return out
