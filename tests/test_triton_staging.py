"""The runtime copy of the model repository that pytriton's tritonserver (Python backend only) serves."""
import os
from pathlib import Path

import pytest
from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

from ensemble.triton.config import load_config, string_parameters
from ensemble.triton.staging import ONNX_RUNNER, stage_runtime_repository

ONNX_MODELS = ("face_detector", "mask_classifier")
UNCHANGED_MODELS = ("preprocess", "postprocess", "mask_detection")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` with its kind, size, mtime and (for files) content."""
    entries = {}
    for path in sorted(root.rglob("*")):
        if "__pycache__" in path.parts:
            continue
        stat = path.lstat()
        content = path.read_bytes() if path.is_file() and stat.st_size < 1 << 20 else None
        entries[str(path.relative_to(root))] = (path.is_symlink(), stat.st_mode, stat.st_size, stat.st_mtime_ns,
                                                content)
    return entries


@pytest.fixture(scope="module")
def staged(model_repository, tmp_path_factory) -> Path:
    return stage_runtime_repository(model_repository, tmp_path_factory.mktemp("staged"), gpu=False)


def test_canonical_repository_is_never_modified(model_repository, tmp_path):
    before = snapshot(model_repository)
    stage_runtime_repository(model_repository, tmp_path, gpu=False)
    assert snapshot(model_repository) == before


@pytest.mark.parametrize("model", ONNX_MODELS)
def test_onnx_models_become_python_models_with_the_same_interface(model, staged, model_repository):
    canonical, runtime = load_config(model_repository / model), load_config(staged / model)
    assert runtime.backend == "python" and not runtime.platform
    for field in ("name", "input", "output", "max_batch_size", "dynamic_batching", "parameters"):
        assert getattr(runtime, field) == getattr(canonical, field), field
    assert canonical.optimization.execution_accelerators.gpu_execution_accelerator
    assert not runtime.optimization.execution_accelerators.gpu_execution_accelerator
    assert (staged / model / "1" / "model.py").read_text() == ONNX_RUNNER.read_text()
    onnx_file = staged / model / "1" / "model.onnx"
    assert onnx_file.is_symlink() and onnx_file.resolve() == (model_repository / model / "1" / "model.onnx").resolve()


@pytest.mark.parametrize(("gpu", "kind"), [(False, ModelInstanceGroup.KIND_CPU), (True, ModelInstanceGroup.KIND_AUTO)])
def test_gpu_instances_fall_back_to_cpu_only_without_a_gpu(gpu, kind, model_repository, tmp_path):
    stage_runtime_repository(model_repository, tmp_path, gpu=gpu)
    for model in ONNX_MODELS:
        assert [group.kind for group in load_config(tmp_path / model).instance_group] == [kind]


@pytest.mark.parametrize("model", UNCHANGED_MODELS)
def test_python_models_and_ensemble_are_staged_as_they_are(model, staged, model_repository):
    assert (staged / model / "config.pbtxt").read_text() == (model_repository / model / "config.pbtxt").read_text()
    for path in (model_repository / model).rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            assert (staged / model / path.relative_to(model_repository / model)).read_bytes() == path.read_bytes()


def test_relative_priors_path_resolves_inside_the_staged_copy(staged, model_repository):
    relative = string_parameters(load_config(staged / "postprocess"))["priors_file"]
    lexical = Path(os.path.normpath(staged / "postprocess" / relative))
    physical = (staged / "postprocess" / relative).resolve()
    canonical = (model_repository / "postprocess" / relative).resolve()
    assert lexical.is_relative_to(staged) and lexical.exists()
    assert physical == canonical and physical.is_file()
