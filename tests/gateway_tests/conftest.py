"""A real tritonserver (the launcher) and a real gunicorn gateway on loopback with free ports, shared by a session."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests

from gateway_helpers import GatewayStack


@pytest.fixture(scope="session")
def gateway_stack(model_repository, artifacts_dir):
    """Triton + gateway for the whole session; a test that stops Triton must start it again."""
    log_dir = artifacts_dir / "gateway"
    log_dir.mkdir(exist_ok=True)
    stack = GatewayStack(model_repository, log_dir)
    with stack.running():
        yield stack


@pytest.fixture(scope="session")
def gateway_url(gateway_stack) -> str:
    return gateway_stack.url


@pytest.fixture(scope="session")
def http():
    """One keep-alive HTTP session, as a real client would use."""
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="session")
def hopper_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def hopper_jpeg(hopper_path) -> bytes:
    return hopper_path.read_bytes()
