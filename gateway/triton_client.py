"""One gRPC client to Triton per gateway worker process, and Triton's failures as typed gateway errors."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.errors import (ApiError, InferenceRejected, ModelNotReady, TritonOverloaded, TritonTimeout,
                            TritonUnreachable, UpstreamError)
from gateway.logging_setup import Throttled
from gateway.settings import SHARED_MEMORY_SYSTEM, Settings
from gateway.shared_memory import (NoRegionForNow, RegionPool, SharedMemoryUnavailable, is_unknown_region,
                                   region_bytes)
from gateway.tracing import ERROR_CODE_ATTRIBUTE, set_rpc_status, triton_call_span, triton_trace_headers

log = logging.getLogger(__name__)
FAILURE_LOG_INTERVAL_S = 10.0  # a Triton outage fails every request: one line per status this often, with a count
_failures = Throttled(log, FAILURE_LOG_INTERVAL_S)

OUTPUTS = ("BOXES", "SCORES", "LABELS", "LABEL_SCORES", "NUM_DETECTIONS")
MAX_GRPC_MESSAGE_BYTES = 2**31 - 1

# Details gRPC gives when no connection could be made or it broke: Triton is down, not busy.
TRANSPORT_FAILURE_HINTS = ("failed to connect", "connection refused", "socket closed", "connection reset",
                           "connect failed", "unreachable", "dns resolution", "broken pipe", "end of tcp stream",
                           "goaway", "keepalive watchdog")
MODEL_MISSING_HINTS = ("unknown model", "no available versions", "is not ready", "not found")
# Triton shutting down (or a composing model already gone) turns requests away with these, as UNAVAILABLE or, from
# inside a BLS call, INTERNAL: a restart to wait out (503), not a full queue (429) nor a fault (502).
SHUTTING_DOWN_HINTS = ("server is stopping", "stopped accepting", "server not ready")
INPUT_NAME = "IMAGE"
# The CLIENT span's attribute saying how the pixels travelled: "system_shared_memory" or "grpc" (inline).
TRANSPORT_ATTRIBUTE = "triton.input.transport"
INLINE_REASON_ATTRIBUTE = "triton.input.inline_reason"  # with shared memory on: why these pixels went inline
SHARED_MEMORY_TRANSPORT, INLINE_TRANSPORT = "system_shared_memory", "grpc"  # also gateway_triton_requests' label


@dataclass(frozen=True)
class ModelDetections:
    """The ensemble's answer for one image, in pixels of the image that was sent."""

    boxes: np.ndarray  # [N, 4] float32 x1 y1 x2 y2
    scores: np.ndarray  # [N] float32 face confidence
    labels: list[str]  # "mask" | "no_mask"
    label_scores: np.ndarray  # [N] float32 probability of the label
    model_version: str
    transport: str  # how the pixels travelled: "system_shared_memory" or "grpc"
    inline_reason: str | None = None  # why they went inline although shared memory was on (shared_memory.py)


@dataclass(frozen=True)
class Readiness:
    """Triton's state as /readyz reports it."""

    ready: bool
    reachable: bool
    reason: str


def _status_name(error: InferenceServerException) -> str:
    """"StatusCode.UNAVAILABLE" -> "UNAVAILABLE" ("" for errors raised by the client library itself)."""
    return (error.status() or "").rsplit(".", 1)[-1]


def translate_error(error: InferenceServerException, settings: Settings) -> ApiError:
    """Classify a Triton/gRPC failure: down (503), model missing or Triton stopping (503), busy (429), slow (504),
    refused (422)."""
    status, detail = _status_name(error), (error.message() or "")
    lowered = detail.lower()
    if status == "DEADLINE_EXCEEDED":
        return TritonTimeout(f"Triton did not answer within {settings.triton_timeout_s:g} s")
    if status == "UNAVAILABLE" and any(hint in lowered for hint in TRANSPORT_FAILURE_HINTS):
        return TritonUnreachable("the Triton inference server is unreachable; retry later")
    if status == "CANCELLED" or any(hint in lowered for hint in SHUTTING_DOWN_HINTS):  # Triton cancels on shutdown
        return ModelNotReady(f"model {settings.model_name!r} is not ready: the Triton inference server is shutting "
                             "down or restarting; retry later")
    if status == "NOT_FOUND" or any(hint in lowered for hint in MODEL_MISSING_HINTS):
        return ModelNotReady(f"model {settings.model_name!r} is not ready on the Triton server; retry later")
    if status in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
        return TritonOverloaded("the Triton inference server is busy (queue full or unavailable); retry later")
    if status == "INVALID_ARGUMENT":
        return InferenceRejected(f"Triton rejected the request: {detail}")
    return UpstreamError("inference failed on the Triton server; see the gateway log for this request_id")


def channel_args(settings: Settings) -> list[tuple[str, int]]:
    """tritonclient's default channel options plus a short reconnect backoff, so a restarted Triton is found quickly."""
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", min(100, settings.triton_reconnect_backoff_ms)),
        ("grpc.min_reconnect_backoff_ms", min(100, settings.triton_reconnect_backoff_ms)),
        ("grpc.max_reconnect_backoff_ms", settings.triton_reconnect_backoff_ms),
    ]


class TritonDetector:
    """Runs the `mask_detection` ensemble on one BGR image per call over a long-lived gRPC channel (thread-safe).

    With `triton_shared_memory = "system"` the pixels travel through this process's shared-memory regions
    (gateway/shared_memory.py) whenever Triton can map them, else inside the request.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = grpcclient.InferenceServerClient(settings.triton_url, channel_args=channel_args(settings))
        self._regions = (RegionPool(self._client, region_bytes(settings.max_side, settings.max_pixels))
                         if settings.triton_shared_memory == SHARED_MEMORY_SYSTEM else None)
        self._outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    def detect(self, image_bgr: np.ndarray, parameters: dict | None = None) -> ModelDetections:
        """Send one HxWx3 uint8 image (as a batch of 1) with optional threshold overrides."""
        image = np.ascontiguousarray(image_bgr[np.newaxis])
        with triton_call_span(self.settings) as span:  # current during the call: Triton's spans hang under it
            try:
                result, transport, inline_reason = self._send(image, parameters or None, span)
            except InferenceServerException as error:
                set_rpc_status(span, _status_name(error), error)
                _failures.warning(str(error.status()), "triton infer failed: status=%s detail=%s", error.status(),
                                  error.message())
                answer = translate_error(error, self.settings)
                span.set_attribute(ERROR_CODE_ATTRIBUTE, answer.code)  # what the caller is told, per image
                raise answer from None
            except Exception as error:  # failed before any gRPC status (a shared-memory error, say): a 500
                set_rpc_status(span, "", error)
                span.record_exception(error)
                span.set_attribute(ERROR_CODE_ATTRIBUTE, ApiError.code)
                raise
            set_rpc_status(span, "OK")
        _failures.settle()
        count = int(result.as_numpy("NUM_DETECTIONS").reshape(-1)[0])
        labels = result.as_numpy("LABELS").reshape(-1)[:count]
        return ModelDetections(
            boxes=result.as_numpy("BOXES").reshape(-1, 4)[:count],
            scores=result.as_numpy("SCORES").reshape(-1)[:count],
            labels=[label.decode() if isinstance(label, bytes) else str(label) for label in labels],
            label_scores=result.as_numpy("LABEL_SCORES").reshape(-1)[:count],
            model_version=result.get_response().model_version, transport=transport, inline_reason=inline_reason,
        )

    def _send(self, image: np.ndarray, parameters: dict | None,
              span) -> tuple[grpcclient.InferResult, str, str | None]:
        """The pixels through a shared-memory region when one can carry them, else inside the request.

        Returns Triton's result, the transport used (the CLIENT span's TRANSPORT_ATTRIBUTE) and, when shared memory
        is on and the pixels went inline all the same, why (INLINE_REASON_ATTRIBUTE).
        """
        inline_reason = None
        if self._regions is not None:
            inline_reason = self._regions.refusal(image)
            if inline_reason is None:
                try:
                    with self._regions.lease() as region:
                        span.set_attribute(TRANSPORT_ATTRIBUTE, SHARED_MEMORY_TRANSPORT)
                        return self._infer_from_region(region, image, parameters), SHARED_MEMORY_TRANSPORT, None
                except NoRegionForNow as no_region:
                    inline_reason = no_region.reason
                except SharedMemoryUnavailable as reason:
                    log.warning("shared memory cannot carry images to Triton at %s (%s); this worker sends images "
                                "inside the gRPC request from now on", self.settings.triton_url, reason)
                    inline_reason = self._regions.unavailable
            span.set_attribute(INLINE_REASON_ATTRIBUTE, inline_reason)
        span.set_attribute(TRANSPORT_ATTRIBUTE, INLINE_TRANSPORT)
        request_input = grpcclient.InferInput(INPUT_NAME, list(image.shape), "UINT8")
        request_input.set_data_from_numpy(image)
        return self._infer(request_input, parameters), INLINE_TRANSPORT, inline_reason

    def _infer_from_region(self, region, image: np.ndarray, parameters: dict | None) -> grpcclient.InferResult:
        """The pixels copied into `region`, the request naming it; registered again if Triton restarted since."""
        region.write(image)
        request_input = grpcclient.InferInput(INPUT_NAME, list(image.shape), "UINT8")
        request_input.set_shared_memory(region.name, image.nbytes)
        try:
            return self._infer(request_input, parameters)
        except InferenceServerException as error:
            if not is_unknown_region(error):
                raise
            self._regions.register_again()
            return self._infer(request_input, parameters)

    def _infer(self, request_input: grpcclient.InferInput, parameters: dict | None) -> grpcclient.InferResult:
        return self._client.infer(
            self.settings.model_name, [request_input], model_version=self.settings.model_version,
            outputs=self._outputs, client_timeout=self.settings.triton_timeout_s, headers=triton_trace_headers(),
            parameters=parameters)

    def readiness(self) -> Readiness:
        """Whether Triton answers and the model is ready, with a reason a person can act on when not."""
        timeout = self.settings.triton_ready_timeout_s
        try:
            if not self._client.is_server_live(client_timeout=timeout):
                return Readiness(False, True, f"Triton at {self.settings.triton_url} is not live")
            if not self._client.is_model_ready(self.settings.model_name, self.settings.model_version,
                                               client_timeout=timeout):
                return Readiness(False, True, f"model {self.settings.model_name!r} is not ready on Triton")
        except InferenceServerException as error:
            return Readiness(False, False, f"Triton at {self.settings.triton_url} is unreachable "
                                    f"({_status_name(error) or 'error'}: {error.message()})")
        return Readiness(True, True, "ok")

    def close(self) -> None:
        """Give back this process's shared-memory regions and close the channel (worker exit)."""
        if self._regions is not None:
            self._regions.close()
        self._client.close()


_worker_detectors: dict[tuple[int, str], TritonDetector] = {}


def init_worker_detector(settings: Settings) -> TritonDetector:
    """Create this worker process's client (gunicorn's post_fork): channels never cross a fork."""
    detector = TritonDetector(settings)
    _worker_detectors[(os.getpid(), settings.triton_url)] = detector
    return detector


def close_worker_detectors() -> None:
    """Close this process's clients (gunicorn's worker_exit): unregisters its shared memory from Triton."""
    for key in [key for key in _worker_detectors if key[0] == os.getpid()]:
        _worker_detectors.pop(key).close()


def worker_detector(settings: Settings) -> TritonDetector:
    """This process's client for `settings.triton_url`, created on first use where no post_fork hook ran."""
    detector = _worker_detectors.get((os.getpid(), settings.triton_url))
    return detector if detector is not None else init_worker_detector(settings)
