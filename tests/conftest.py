"""Shared fixtures: the built model repository, the in-process reference pipeline and the real test images."""
from pathlib import Path

import pytest

from ensemble.build import build
from ensemble.reference import DEFAULT_REPOSITORY, ReferencePipeline

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="session")
def model_repository() -> Path:
    """The canonical repository with both ONNX models exported (a no-op when they are current)."""
    build(DEFAULT_REPOSITORY, log=lambda _: None)
    return DEFAULT_REPOSITORY


@pytest.fixture(scope="session")
def reference_pipeline(model_repository) -> ReferencePipeline:
    return ReferencePipeline(model_repository)


@pytest.fixture(scope="session")
def real_images():
    """grace_hopper (matplotlib) and astronaut (scikit-image) as BGR uint8, one face each."""
    from ensemble.sample_images import real_images as load

    return load()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files for a person to look at (git-ignored)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def triton_server(model_repository, tmp_path_factory):
    """One real tritonserver (pytriton's CPU build, free ports) serving the canonical repository for the session."""
    from ensemble.triton.launcher import TritonServer

    log_file = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with TritonServer(model_repository, log_file=log_file) as server:
        yield server
