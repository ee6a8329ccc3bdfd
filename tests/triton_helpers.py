"""Tiny model repositories that test the Triton plumbing in seconds, independent of the real models."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TINY_WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def tiny_outputs(x: np.ndarray) -> dict[str, np.ndarray]:
    """What the tiny ONNX graph computes: a matmul and a row sum, two outputs to slice back per request."""
    return {"y": x @ TINY_WEIGHTS, "total": x.sum(axis=1, keepdims=True)}


def write_tiny_onnx(path: Path) -> None:
    """x [N, 4] -> y = x @ W [N, 3], total = sum(x) [N, 1]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(TINY_WEIGHTS, "W"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime this project allows
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def write_model(repository: Path, name: str, config: str, files: dict[str, str] | None = None) -> Path:
    """A model directory: config.pbtxt plus text files (e.g. "1/model.py") relative to it."""
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(textwrap.dedent(config))
    for relative, text in (files or {}).items():
        (model_dir / relative).write_text(textwrap.dedent(text))
    return model_dir


def write_tiny_onnx_model(repository: Path, name: str = "tiny", *, batching: str = "", max_batch_size: int = 16,
                          extra: str = "") -> Path:
    """The tiny graph as an onnxruntime-backend model, the way the canonical repository declares its models."""
    dims = "[ 4 ]" if max_batch_size else "[ -1, 4 ]"
    out_y, out_total = ("[ 3 ]", "[ 1 ]") if max_batch_size else ("[ -1, 3 ]", "[ -1, 1 ]")
    model_dir = write_model(repository, name, f"""
        name: "{name}"
        backend: "onnxruntime"
        max_batch_size: {max_batch_size}
        input [ {{ name: "x", data_type: TYPE_FP32, dims: {dims} }} ]
        output [
          {{ name: "y", data_type: TYPE_FP32, dims: {out_y} }},
          {{ name: "total", data_type: TYPE_FP32, dims: {out_total} }}
        ]
        {batching}
        instance_group [ {{ count: 1, kind: KIND_AUTO }} ]
        {extra}
    """)
    write_tiny_onnx(model_dir / "1" / "model.onnx")
    return model_dir


ECHO_CONFIG = """
    name: "echo"
    backend: "python"
    max_batch_size: 4
    input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]
    output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] } ]
    instance_group [ { count: 1, kind: KIND_CPU } ]
"""
ECHO_MODEL = """
    from ensemble.triton import pb

    class TritonPythonModel:
        def execute(self, requests):
            return pb.respond_each(requests, lambda request: {"Y": pb.input_array(request, "X")})
"""


def write_echo_model(repository: Path) -> Path:
    """The quickest Python model to load: Y = X."""
    return write_model(repository, "echo", ECHO_CONFIG, {"1/model.py": ECHO_MODEL})
