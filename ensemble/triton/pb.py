"""PyTriton-style helpers for Python-backend models: one request's failure stays that request's error."""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ensemble.errors import InvalidRequest

Arrays = Mapping[str, np.ndarray]


def _pb_utils():
    """Triton's module exists only inside the Python-backend stub, so it is imported on first use."""
    return importlib.import_module("triton_python_backend_utils")


def model_config(args: Mapping[str, str]) -> dict[str, Any]:
    """The model's config as Triton hands it to `initialize` (JSON of the ModelConfig message)."""
    return json.loads(args["model_config"])


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The config's `parameters` map as plain strings."""
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def request_parameters(request) -> dict[str, Any]:
    """The request's `parameters` (also those an ensemble passes on to each of its steps)."""
    return json.loads(request.parameters() or "{}")


def bls_parameters(request) -> dict[str, bool | int | str]:
    """The request's parameters passed on to a BLS call, which takes only bool/int/str values (floats as text)."""
    return {key: value if isinstance(value, (bool, int, str)) else str(value)
            for key, value in request_parameters(request).items()}


def input_array(request, name: str) -> np.ndarray:
    """One input as numpy; a missing input is the caller's error, not the model's."""
    tensor = _pb_utils().get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidRequest(f"request has no input {name!r}")
    return tensor.as_numpy()


def outputs_response(outputs: Arrays):
    """An InferenceResponse carrying each array under its output name."""
    pb_utils = _pb_utils()
    return pb_utils.InferenceResponse([pb_utils.Tensor(name, np.ascontiguousarray(array))
                                       for name, array in outputs.items()])


def error_response(exc: BaseException):
    """A response that fails one request: InvalidRequest is the caller's fault (INVALID_ARG), anything else INTERNAL."""
    pb_utils = _pb_utils()
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, InvalidRequest) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}", code))


def respond_each(requests: Sequence, handle: Callable[[Any], Arrays]) -> list:
    """Run `handle` per request; an exception becomes that request's error response and the others go on."""
    responses = []
    for request in requests:
        try:
            responses.append(outputs_response(handle(request)))
        except Exception as exc:  # noqa: BLE001 - every failure must reach its own client, not kill the batch
            responses.append(error_response(exc))
    return responses


def respond_batched(requests: Sequence, read_inputs: Callable[[Any], Arrays],
                    run: Callable[[Arrays], Arrays]) -> list:
    """Concatenate all requests' inputs along the batch axis, `run` once per shape group, slice outputs back.

    A request whose inputs cannot be read fails alone; when a joint `run` fails, the requests are run one by
    one, so only those that fail on their own get an error.
    """
    responses: list = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, Arrays]]] = {}
    for index, request in enumerate(requests):
        try:
            inputs = read_inputs(request)
        except Exception as exc:  # noqa: BLE001
            responses[index] = error_response(exc)
            continue
        shape_key = tuple((name, array.shape[1:], array.dtype.str) for name, array in inputs.items())
        groups.setdefault(shape_key, []).append((index, inputs))
    for members in groups.values():
        for index, response in zip((index for index, _ in members), _run_group(members, run)):
            responses[index] = response
    return responses


def _run_group(members: list[tuple[int, Arrays]], run: Callable[[Arrays], Arrays]) -> list:
    """One run for requests whose inputs share their per-item shapes; when it fails, each request runs alone,
    so only one that fails by itself gets an error."""
    try:
        return _joint_run(members, run)
    except Exception as exc:  # noqa: BLE001
        if len(members) == 1:
            return [error_response(exc)]
        return [response for member in members for response in _run_group([member], run)]


def _joint_run(members: list[tuple[int, Arrays]], run: Callable[[Arrays], Arrays]) -> list:
    names = members[0][1].keys()
    joined = members[0][1] if len(members) == 1 else {  # a lone request's arrays need no copy
        name: np.concatenate([inputs[name] for _, inputs in members]) for name in names}
    sizes = [len(next(iter(inputs.values()))) for _, inputs in members]
    outputs = run(joined)
    uneven = sorted(name for name, array in outputs.items() if len(array) != sum(sizes))
    if uneven:
        raise RuntimeError(f"outputs {uneven} do not have one row per input row ({sum(sizes)})")
    bounds = np.cumsum([0, *sizes])
    return [outputs_response({name: array[start:stop] for name, array in outputs.items()})
            for start, stop in zip(bounds[:-1], bounds[1:])]
