"""Triton failures map to the documented statuses, and trace context reaches Triton only when sampled."""
import math

import numpy as np
import pytest
from flask import Flask
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import StatusCode
from tritonclient.utils import InferenceServerException
from werkzeug.datastructures import MultiDict

from gateway.errors import (InferenceRejected, InvalidParameter, ModelNotReady, ParameterOutOfRange,
                            TritonOverloaded, TritonTimeout, TritonUnreachable, UpstreamError, status_of)
from gateway.params import parse_detect_params
from gateway.request_id import request_id_from
from gateway.settings import Settings
from gateway.tracing import ERROR_CODE_ATTRIBUTE, PROVIDER_KEY, triton_trace_headers
from gateway.triton_client import TritonDetector, translate_error


@pytest.mark.parametrize("status, message, expected, http_status", [
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8001: "
     "Failed to connect to remote host: Connection refused", TritonUnreachable, 503),
    ("StatusCode.UNAVAILABLE", "Socket closed", TritonUnreachable, 503),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", TritonTimeout, 504),
    ("StatusCode.UNAVAILABLE", "Exceeds maximum queue size", TritonOverloaded, 429),
    ("StatusCode.RESOURCE_EXHAUSTED", "too many requests", TritonOverloaded, 429),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'mask_detection' is not found", ModelNotReady, 503),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'mask_detection' has no available versions",
     ModelNotReady, 503),
    # Triton 2.51 shutting down under load (seen over gRPC, word for word): a restart to wait out, not a full queue
    ("StatusCode.UNAVAILABLE", "in ensemble 'mask_detection', [request id: <id_unknown>] Server is stopping, "
     "scheduler for model has stopped accepting new inference requests", ModelNotReady, 503),
    ("StatusCode.INTERNAL", "in ensemble 'mask_detection', RuntimeError: mask_classifier: Model mask_classifier - "
     "Error when running inference: Server not ready", ModelNotReady, 503),
    ("StatusCode.CANCELLED", "CANCELLED", ModelNotReady, 503),
    ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'IMAGE'", InferenceRejected, 422),
    ("StatusCode.INTERNAL", "TritonModelException: boom", UpstreamError, 502),
    (None, "client-side validation failed", UpstreamError, 502),
])
def test_triton_errors_translate_to_documented_statuses(status, message, expected, http_status):
    error = translate_error(InferenceServerException(msg=message, status=status), Settings())
    assert type(error) is expected
    assert status_of(error) == http_status
    assert "Traceback" not in error.message


def _headers_inside_span(sampler):
    tracer = TracerProvider(sampler=sampler).get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        return triton_trace_headers(), span.get_span_context()


def test_sampled_spans_send_their_traceparent_to_triton():
    headers, context = _headers_inside_span(ALWAYS_ON)
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert int(flags, 16) & 0x01  # sampled


def test_sampled_out_spans_send_no_trace_context():
    headers, _ = _headers_inside_span(ALWAYS_OFF)
    assert headers is None
    assert triton_trace_headers() is None  # and none outside any span


def _app_recording_spans() -> tuple[Flask, InMemorySpanExporter]:
    """An app whose tracer (what TritonDetector uses inside its context) samples and keeps every span."""
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = Flask(__name__)
    app.extensions[PROVIDER_KEY] = provider
    return app, spans


def test_a_failure_before_any_grpc_status_marks_the_triton_span_failed():
    """The fake: the pixels cannot be written (a full /dev/shm, say), a fault not safely caused on a shared host."""
    app, spans = _app_recording_spans()
    detector = TritonDetector(Settings(triton_url="127.0.0.1:1", triton_shared_memory="off"))

    def fail(*_):
        raise OSError(28, "No space left on device")

    detector._send = fail
    try:
        with app.app_context(), pytest.raises(OSError):
            detector.detect(np.zeros((8, 8, 3), np.uint8))
    finally:
        detector.close()
    (span,) = spans.get_finished_spans()
    assert span.name.endswith("/ModelInfer") and span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "OSError"
    assert span.attributes[ERROR_CODE_ATTRIBUTE] == "internal_error"  # the 500 the caller gets
    assert [event.name for event in span.events] == ["exception"]


def test_a_failed_triton_call_names_the_callers_error_code_on_its_span():
    """A real refused connection (nothing listens on port 1): the CLIENT span says UNAVAILABLE and which answer the
    caller got, since one gRPC status stands for several (Triton gone, model missing, queue full)."""
    app, spans = _app_recording_spans()
    detector = TritonDetector(Settings(triton_url="127.0.0.1:1", triton_shared_memory="off", triton_timeout_s=5))
    try:
        with app.app_context(), pytest.raises(TritonUnreachable):
            detector.detect(np.zeros((8, 8, 3), np.uint8))
    finally:
        detector.close()
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR and span.attributes["error.type"] == "UNAVAILABLE"
    assert span.attributes[ERROR_CODE_ATTRIBUTE] == TritonUnreachable.code == "triton_unreachable"


@pytest.mark.parametrize("query, error", [
    ({"confidence": "-0.5"}, ParameterOutOfRange),
    ({"confidence": "0"}, ParameterOutOfRange),
    ({"confidence": "1.5"}, ParameterOutOfRange),
    ({"confidence": "nan"}, ParameterOutOfRange),
    ({"iou": "inf"}, ParameterOutOfRange),
    ({"confidence": "high"}, InvalidParameter),
    ({"iou": ""}, InvalidParameter),
    ({"max_faces": "0"}, ParameterOutOfRange),
    ({"max_faces": "2.5"}, InvalidParameter),
    ({"max_faces": "many"}, InvalidParameter),
])
def test_bad_parameters_are_named(query, error):
    with pytest.raises(error, match=next(iter(query))):
        parse_detect_params(MultiDict(query))


@pytest.mark.parametrize("value, error", [("9" * 5000, ParameterOutOfRange), ("x" * 5000, InvalidParameter),
                                          ("+-" + "5" * 5000, InvalidParameter), ("²" * 5000, InvalidParameter)],
                         ids=["more_digits_than_python_converts", "long_text", "two_signs", "superscripts"])
def test_a_huge_value_is_judged_as_what_it_is_and_quoted_short(value, error):
    """4300 digits is Python's int() limit: such a value is a number far out of range (422), not "not a number";
    either way the message quotes 64 characters of it, not 5000."""
    with pytest.raises(error) as raised:
        parse_detect_params(MultiDict({"max_faces": value}))
    assert str(raised.value) == f"max_faces must be an integer in [1, 1000], got {value[:64]!r}..."


@pytest.mark.parametrize("raw, expected", [("0" * 4400 + "5", 5), (" +7 ", 7), ("1000", 1000)])
def test_integers_are_read_by_their_value_whatever_their_leading_zeros(raw, expected):
    assert parse_detect_params(MultiDict({"max_faces": raw})).max_faces == expected


@pytest.mark.parametrize("raw", ["1_0", "\u0665", "1e2", "0x10"])  # int() takes the first two; no caller means them
def test_integers_are_ascii_decimal_digits(raw):
    with pytest.raises(InvalidParameter):
        parse_detect_params(MultiDict({"max_faces": raw}))


@pytest.mark.parametrize("query, mentions", [
    ([("confidense", "0.9")], "unknown parameter 'confidense'; the parameters are confidence, iou, max_faces"),
    ([("confidence", "0.9"), ("confidence", "0.2")], "confidence is given 2 times"),
])
def test_unknown_or_repeated_parameters_are_refused_not_ignored(query, mentions):
    with pytest.raises(InvalidParameter, match=mentions):
        parse_detect_params(MultiDict(query))


def test_parameters_reach_triton_as_types_its_python_backend_accepts():
    params = parse_detect_params(MultiDict({"confidence": "0.7", "iou": "1", "max_faces": "3"}))
    sent = params.triton_parameters()
    assert sent == {"confidence": "0.7", "iou": "1.0", "max_faces": 3}
    assert math.isclose(float(sent["confidence"]), 0.7)
    assert parse_detect_params(MultiDict()).triton_parameters() == {}


@pytest.mark.parametrize("sent, echoed", [
    ("client-42.a:b_c", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("bad id", False),
    ("inject\r\nX-Evil: 1", False),
    ("-leading-dash", False),
    ("", False),
    (None, False),
])
def test_request_ids_are_echoed_only_when_safe(sent, echoed):
    got = request_id_from(sent)
    assert (got == sent) is echoed
    assert 1 <= len(got) <= 128
