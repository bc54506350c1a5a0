import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def project(pytester, monkeypatch):
    """A pytester project with auditkit's toy models and gate (tests/plugin_project.py)."""
    from tests.plugin_project import make_project

    return make_project(pytester, monkeypatch)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="CUDA is not available"))
