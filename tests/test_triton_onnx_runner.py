"""onnx_runner and the pb helpers inside a real tritonserver, on tiny generated models."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc.model_config_pb2 import ModelInstanceGroup
from tritonclient.utils import InferenceServerException

from ensemble.triton.launcher import TritonServer, TritonStartError
from triton_helpers import tiny_outputs, write_model, write_tiny_onnx_model

pytestmark = pytest.mark.triton

CONCURRENT_REQUESTS = 16
SCALER_CONFIG = """
    name: "scaler"
    backend: "python"
    max_batch_size: 8
    input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]
    output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] } ]
    # Wait long enough that concurrent requests always meet in one execute() call.
    dynamic_batching { preferred_batch_size: [ 4 ], max_queue_delay_microseconds: 1000000 }
    instance_group [ { count: 1, kind: KIND_CPU } ]
"""
SCALER_MODEL = """
    import numpy as np
    from ensemble.triton import pb

    class TritonPythonModel:
        def execute(self, requests):
            return pb.respond_batched(requests, self._read, self._scale)

        def _scale(self, batch):
            if (batch["factor"] < 0).any():  # found only when run, as a model's own failure would be
                raise RuntimeError("factor must not be negative")
            if (batch["factor"] == 7).any():  # a bug: numpy's ValueError is the model's fault, not the caller's
                np.zeros(3).reshape(2)
            return {"Y": batch["X"] * batch["factor"]}

        def _read(self, request):
            x = pb.input_array(request, "X")
            factor = pb.request_parameters(request).get("factor", 1)
            if not isinstance(factor, (int, float)):
                raise pb.InvalidRequest(f"factor must be a number, got {factor!r}")
            return {"X": x, "factor": np.full((len(x), 1), factor, np.float32)}
"""


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("tiny_repository")
    write_tiny_onnx_model(
        repository, "tiny",
        batching="dynamic_batching { max_queue_delay_microseconds: 100000 }",
        extra="""parameters { key: "intra_op_thread_count", value: { string_value: "1" } }
                 optimization { execution_accelerators { gpu_execution_accelerator: [
                   { name: "tensorrt", parameters { key: "precision_mode", value: "FP16" } } ] } }""")
    write_tiny_onnx_model(repository, "tiny_unbatched", max_batch_size=0)
    write_model(repository, "scaler", SCALER_CONFIG, {"1/model.py": SCALER_MODEL})
    with TritonServer(repository, log_file=tmp_path_factory.mktemp("logs") / "tiny.log") as server:
        yield server


@pytest.fixture()
def client(tiny_server):
    with grpcclient.InferenceServerClient(tiny_server.grpc_url) as client:
        yield client


def infer(client, model, x, outputs=("y", "total"), **kwargs):
    tensor = grpcclient.InferInput("X" if model == "scaler" else "x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], **kwargs)
    return {name: result.as_numpy(name) for name in outputs}


def counts(client, model):
    stats = client.get_inference_statistics(model).model_stats[0]
    return stats.inference_count, stats.execution_count


def test_concurrent_requests_are_batched_and_sliced_back_correctly(client):
    rng = np.random.default_rng(0)
    inputs = [rng.random((1 + i % 3, 4), dtype=np.float32) for i in range(CONCURRENT_REQUESTS)]
    inferences_before, executions_before = counts(client, "tiny")
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        results = list(pool.map(lambda x: infer(client, "tiny", x), inputs))
    for x, result in zip(inputs, results):
        for name, expected in tiny_outputs(x).items():
            np.testing.assert_allclose(result[name], expected, rtol=1e-6, err_msg=name)
    inferences, executions = counts(client, "tiny")
    assert inferences - inferences_before == sum(len(x) for x in inputs)
    assert executions - executions_before < CONCURRENT_REQUESTS  # requests met in one session run


def test_model_without_batching_runs_each_request(client):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    result = infer(client, "tiny_unbatched", x)
    for name, expected in tiny_outputs(x).items():
        np.testing.assert_allclose(result[name], expected, rtol=1e-6)


def test_staged_config_as_triton_sees_it(client):
    config = client.get_model_config("tiny").config
    assert config.backend == "python"
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert config.dynamic_batching.max_queue_delay_microseconds == 100000
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert [group.kind for group in config.instance_group] == [ModelInstanceGroup.KIND_CPU]


def _scale_together(client, factors, x):
    """Each factor's scaler call, sent at once so they meet in one execute(): its Y, or the error it got."""
    def call(factor):
        try:
            return infer(client, "scaler", x, outputs=("Y",), parameters={"factor": factor})["Y"]
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(len(factors)) as pool:
        return list(pool.map(call, factors))


def test_bad_request_fails_alone_while_batched_with_good_ones(client):
    factors = [2, "not a number", 3, 0.5]
    x = np.array([[1.0, -2.0]], np.float32)
    inferences_before, executions_before = counts(client, "scaler")
    for factor, result in zip(factors, _scale_together(client, factors, x)):
        if isinstance(factor, str):
            assert isinstance(result, InferenceServerException)
            assert "factor must be a number" in result.message() and result.status() == "StatusCode.INVALID_ARGUMENT"
        else:
            np.testing.assert_allclose(result, x * factor)
    inferences, executions = counts(client, "scaler")
    assert (inferences - inferences_before, executions - executions_before) == (len(factors), 1)


def test_a_request_whose_run_fails_fails_alone_when_run_together_with_good_ones(client):
    factors = [2, -1, 3, 0.5]
    x = np.array([[1.0, -2.0]], np.float32)
    _, executions_before = counts(client, "scaler")
    for factor, result in zip(factors, _scale_together(client, factors, x)):
        if factor < 0:
            assert isinstance(result, InferenceServerException) and "must not be negative" in result.message()
            assert result.status() == "StatusCode.INTERNAL"
        else:
            np.testing.assert_allclose(result, x * factor)
    _, executions = counts(client, "scaler")
    assert executions - executions_before == 1  # they met in one execute(): the joint run failed, then each alone


def test_a_valueerror_from_a_models_own_bug_is_internal_not_the_callers(client):
    with pytest.raises(InferenceServerException) as error:
        infer(client, "scaler", np.array([[1.0, 2.0]], np.float32), outputs=("Y",), parameters={"factor": 7})
    assert error.value.status() == "StatusCode.INTERNAL" and "cannot reshape" in error.value.message()


def test_a_config_naming_tensors_the_graph_lacks_fails_to_load_and_says_which(tmp_path):
    """Loaded anyway, the model would fail every request at run time; the load names the mismatch instead."""
    repository = tmp_path / "repository"
    config = write_tiny_onnx_model(repository, "misnamed") / "config.pbtxt"
    config.write_text(config.read_text().replace('name: "x"', 'name: "pixels"').replace('name: "total"',
                                                                                        'name: "sum"'))
    with pytest.raises(TritonStartError) as error:
        TritonServer(repository, ready_timeout=60, log_file=tmp_path / "tritonserver.log").start()
    report = str(error.value)
    assert "model 'misnamed' failed to load" in report
    assert "config.pbtxt names ['pixels', 'sum'] but the graph has inputs ['x'] and outputs ['total', 'y']" in report
