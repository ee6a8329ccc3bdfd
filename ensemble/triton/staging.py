"""Turn the canonical model repository into one the pip-installed tritonserver (Python backend only) can serve."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup

from ensemble.triton.config import CONFIG_FILE, ModelConfig, is_onnxruntime, load_config, save_config

PYTHON_BACKEND = "python"
PYTHON_MODEL_FILE = "model.py"
ONNX_RUNNER = Path(__file__).with_name("onnx_runner.py")  # a file to copy; importing it needs Triton
GPU_KINDS = (ModelInstanceGroup.KIND_GPU, ModelInstanceGroup.KIND_AUTO)


def gpu_visible() -> bool:
    """Whether an NVIDIA device is present and not hidden by CUDA_VISIBLE_DEVICES."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return any(Path("/dev").glob("nvidia[0-9]*"))


def stage_runtime_repository(canonical: Path, dest: Path, *, gpu: bool | None = None) -> Path:
    """Mirror `canonical` into `dest` (files symlinked, directories real) with every ONNX model on onnx_runner.

    Directories are real and files are links, so a relative path such as postprocess's `1/priors.npy` (or one
    reaching into a sibling model) resolves inside `dest` whether read lexically or through the links.
    The canonical repository is only read. `gpu=None` asks the machine.
    """
    canonical, dest = Path(canonical).resolve(), Path(dest)
    gpu = gpu_visible() if gpu is None else gpu
    dest.mkdir(parents=True, exist_ok=True)
    for model_dir in sorted(path.parent for path in canonical.glob(f"*/{CONFIG_FILE}")):
        staged = dest / model_dir.name
        mirror_tree(model_dir, staged)
        config = load_config(model_dir)
        if is_onnxruntime(config):
            _serve_with_onnx_runner(config, staged, gpu=gpu)
    return dest


def runtime_config(config: ModelConfig, *, gpu: bool) -> ModelConfig:
    """The same model (name, tensors, batching, parameters) on the Python backend."""
    staged = ModelConfig()
    staged.CopyFrom(config)
    staged.backend = PYTHON_BACKEND
    staged.ClearField("platform")
    staged.ClearField("default_model_filename")  # the Python backend would take it for the .py file's name
    # The TensorRT accelerator is an instruction to Triton's onnxruntime backend; the Python backend ignores
    # it, so keeping it would claim an FP16 engine that is never built. onnx_runner picks CUDA or CPU itself.
    staged.optimization.ClearField("execution_accelerators")
    if not gpu:
        for group in staged.instance_group:
            if group.kind in GPU_KINDS:
                group.kind = ModelInstanceGroup.KIND_CPU
                group.ClearField("gpus")
    return staged


def _serve_with_onnx_runner(config: ModelConfig, staged: Path, *, gpu: bool) -> None:
    """Rewrite the staged config and put onnx_runner into every version directory."""
    (staged / CONFIG_FILE).unlink()
    save_config(runtime_config(config, gpu=gpu), staged / CONFIG_FILE)
    for version_dir in (path for path in staged.iterdir() if path.is_dir() and path.name.isdigit()):
        runner = version_dir / PYTHON_MODEL_FILE
        runner.unlink(missing_ok=True)  # a link into the canonical repository must not be written through
        shutil.copyfile(ONNX_RUNNER, runner)


def mirror_tree(source: Path, dest: Path) -> None:
    """Recreate `source`'s directories under `dest` and link every file to its canonical original."""
    for root, dirs, files in os.walk(source):
        dirs[:] = [name for name in dirs if name != "__pycache__"]
        target = dest / Path(root).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).symlink_to(Path(root) / name)
