"""Shared pytest set-up. Run the suite from the repo root with `python -m pytest`."""
import pytest


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so a bare `pytest -c /dev/null` knows it
    config.addinivalue_line("markers", "real: uses the real pretrained weights from the asset packages")


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
    assert main(["train-teacher", "--config", str(config), "--teacher.checkpoint", str(path)]) == 0
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
    ms.set_context(mode=ms.GRAPH_MODE)
    assert Distiller(cfg).run() is not None
    return out
