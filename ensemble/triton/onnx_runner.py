"""One Python-backend model that serves any ONNX file with onnxruntime, for Triton builds without that backend.

Staging copies this file as `<model>/<version>/model.py`; it reads `model.onnx` beside itself and its tensor
names from the model's own config.pbtxt, and batches the way PyTriton does: the requests of one `execute`
call whose inputs share their per-item shapes are concatenated and run through the session once (a model
without batching runs each request alone).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from ensemble.triton import pb
from ensemble.triton.config import ort_session_entries

# Same key as Triton's onnxruntime backend, so one config.pbtxt means the same thing to both.
INTRA_OP_THREADS = "intra_op_thread_count"
MODEL_FILE = "model.onnx"


class TritonPythonModel:
    """onnxruntime session behind Triton's Python backend."""

    def initialize(self, args):
        config = pb.model_config(args)
        self._input_names = [spec["name"] for spec in config["input"]]
        self._output_types = {spec["name"]: pb_utils.triton_string_to_numpy(spec["data_type"])
                              for spec in config["output"]}
        self._batched = int(config.get("max_batch_size", 0)) > 0
        path = Path(args["model_repository"]) / args["model_version"] / MODEL_FILE
        self._session = ort.InferenceSession(str(path), _session_options(config), providers=_providers(args))
        _check_names(path, self._session, self._input_names, self._output_types)

    def execute(self, requests):
        if self._batched:
            return pb.respond_batched(requests, self._read_inputs, self._run)
        return pb.respond_each(requests, lambda request: self._run(self._read_inputs(request)))

    def _read_inputs(self, request) -> dict[str, np.ndarray]:
        return {name: pb.input_array(request, name) for name in self._input_names}

    def _run(self, inputs: pb.Arrays) -> dict[str, np.ndarray]:
        names = list(self._output_types)
        results = self._session.run(names, dict(inputs))
        return {name: result.astype(self._output_types[name], copy=False) for name, result in zip(names, results)}


def _session_options(config) -> ort.SessionOptions:
    """Thread count and `session.*` entries from the config's parameters; onnxruntime's defaults otherwise."""
    options = ort.SessionOptions()
    parameters = pb.config_parameters(config)
    if parameters.get(INTRA_OP_THREADS):
        options.intra_op_num_threads = int(parameters[INTRA_OP_THREADS])
    for key, value in ort_session_entries(parameters).items():
        options.add_session_config_entry(key, value)
    return options


def _providers(args) -> list:
    """CUDA for GPU instances when this onnxruntime build has it; the CPU otherwise."""
    if args["model_instance_kind"] == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _check_names(path: Path, session: ort.InferenceSession, inputs, outputs) -> None:
    """Fail the load, not the first request, when config.pbtxt and the ONNX graph disagree on tensor names."""
    graph_inputs = {node.name for node in session.get_inputs()}
    graph_outputs = {node.name for node in session.get_outputs()}
    missing = sorted(set(inputs) - graph_inputs) + sorted(set(outputs) - graph_outputs)
    if missing:
        raise ValueError(f"{path}: config.pbtxt names {missing} but the graph has inputs {sorted(graph_inputs)} "
                         f"and outputs {sorted(graph_outputs)}")
