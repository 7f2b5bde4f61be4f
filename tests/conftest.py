"""Shared pytest set-up. Run the suite from the repo root with `python -m pytest`."""


def pytest_configure(config):
    # also declared in pyproject.toml; repeated here so a bare `pytest -c /dev/null` knows it
    config.addinivalue_line("markers", "real: uses the real pretrained weights from the asset packages")
