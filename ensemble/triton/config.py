"""Read and write config.pbtxt with Triton's own protobuf schema, so no hand-written parser can drift from it."""
from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig

CONFIG_FILE = "config.pbtxt"
ONNXRUNTIME_BACKEND = "onnxruntime"
ONNXRUNTIME_PLATFORM = "onnxruntime_onnx"


def type_name(tensor) -> str:
    """A config tensor's data type as config.pbtxt spells it ("TYPE_FP32")."""
    return DataType.Name(tensor.data_type)


def parse_config(text: str) -> ModelConfig:
    """Parse config.pbtxt text; unknown fields raise, as they would in Triton."""
    return text_format.Parse(text, ModelConfig())


def load_config(path: Path) -> ModelConfig:
    """Load a model's config.pbtxt (or the one inside a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    return parse_config(path.read_text())


def format_config(config: ModelConfig) -> str:
    """Text format as Triton reads it."""
    return text_format.MessageToString(config)


def save_config(config: ModelConfig, path: Path) -> None:
    """Write a config.pbtxt (into `path` itself, or into it when it is a model directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    path.write_text(format_config(config))


def string_parameters(config: ModelConfig) -> dict[str, str]:
    """The `parameters` map as plain strings, the form Python models and the onnxruntime backend read."""
    return {key: value.string_value for key, value in config.parameters.items()}


ORT_SESSION_PREFIX = "session."


def ort_session_entries(parameters: dict[str, str]) -> dict[str, str]:
    """Parameters named like ONNX Runtime session config keys (e.g. `session.intra_op.allow_spinning`)."""
    return {key: value for key, value in parameters.items() if key.startswith(ORT_SESSION_PREFIX)}


def is_onnxruntime(config: ModelConfig) -> bool:
    """True for models Triton would serve with its onnxruntime backend."""
    return config.backend == ONNXRUNTIME_BACKEND or config.platform == ONNXRUNTIME_PLATFORM
