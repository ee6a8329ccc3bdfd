"""The gateway's own log lines carry the request id and, for a sampled request, its trace and span ids."""
import logging

from flask import Flask, g
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from gateway.logging_setup import FORMAT, RequestIdFilter, Throttled


def _line(sampler=None) -> str:
    """One warning formatted as the gateway writes it, inside a request and (with a sampler) a span."""
    record = logging.LogRecord("gateway.triton_client", logging.WARNING, __file__, 1, "triton infer failed", (), None)
    app = Flask(__name__)
    with app.test_request_context():
        g.request_id = "client-42"
        if sampler is None:
            RequestIdFilter().filter(record)
            return logging.Formatter(FORMAT).format(record)
        with TracerProvider(sampler=sampler).get_tracer("test").start_as_current_span("request") as span:
            RequestIdFilter().filter(record)
            context = span.get_span_context()
    return logging.Formatter(FORMAT).format(record), context


def test_a_sampled_request_logs_its_trace_and_span_ids():
    line, context = _line(ALWAYS_ON)
    assert f"request_id=client-42 trace_id={context.trace_id:032x} span_id={context.span_id:016x}:" in line


def test_an_unsampled_request_names_no_trace():
    """Only traces a backend can show are named, as in the access log and the exemplars."""
    line, context = _line(ALWAYS_OFF)
    assert "request_id=client-42 trace_id=- span_id=-:" in line
    assert f"{context.trace_id:032x}" not in line


def test_outside_a_span_the_ids_are_dashes():
    assert "request_id=client-42 trace_id=- span_id=-: triton infer failed" in _line()


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_repeated_failures_are_logged_once_per_interval_with_a_count(caplog):
    """A Triton outage fails every request; the log gets one line per status and interval, not one per request."""
    clock = _Clock()
    throttled = Throttled(logging.getLogger("test.throttled"), 10.0, clock)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(5):
            throttled.warning("UNAVAILABLE", "triton infer failed: status=%s", "UNAVAILABLE")
        throttled.warning("DEADLINE_EXCEEDED", "triton infer failed: status=%s", "DEADLINE_EXCEEDED")  # its own key
        clock.now += 9.9
        throttled.warning("UNAVAILABLE", "triton infer failed: status=%s", "UNAVAILABLE")
        clock.now += 0.2
        throttled.warning("UNAVAILABLE", "triton infer failed: status=%s", "UNAVAILABLE")
    assert [record.getMessage() for record in caplog.records] == [
        "triton infer failed: status=UNAVAILABLE",
        "triton infer failed: status=DEADLINE_EXCEEDED",
        "triton infer failed: status=UNAVAILABLE (5 more like it in the last 10 s)",
    ]
