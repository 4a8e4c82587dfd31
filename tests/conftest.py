from __future__ import annotations

import pytest

from tests.helpers.models import export_tiny
from tests.helpers.servers import RunningServer, make_config


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """Two tiny models that differ only in pooling, like the shipped pair."""
    directory = tmp_path_factory.mktemp("models")
    export_tiny(directory, "tiny-max", pool="max")
    export_tiny(directory, "tiny-avg", pool="avg", pool_size=3)
    return directory


@pytest.fixture(scope="module")
def tiny_server(tiny_models_dir):
    running = RunningServer(make_config(tiny_models_dir))
    yield running
    running.stop(grace=1.0)


@pytest.fixture()
def tiny_client(tiny_server):
    from cifar10_serving.client import ClassifierClient

    with ClassifierClient(tiny_server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def triton_python():
    """The python of a venv holding NVIDIA's tritonclient (tests/helpers/tritonclient_venv.py)."""
    from tests.helpers.tritonclient_venv import triton_python as make

    return make()
