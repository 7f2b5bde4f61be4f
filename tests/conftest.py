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
