"""The gateway's own log lines carry the request id and, for a sampled request, its trace and span ids."""
import json
import logging
import os
import sys

import pytest
import requests
from flask import Flask, g
from gateway_helpers import Gunicorn, free_port
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from gateway.log_format import JsonFormatter
from gateway.logging_setup import FORMAT, RequestIdFilter, Throttled


def _line(sampler=None):
    """(one warning formatted as the gateway writes it inside a request, the span's context or None): with a
    sampler, the warning is written inside a span of that sampler."""
    record = logging.LogRecord("gateway.triton_client", logging.WARNING, __file__, 1, "triton infer failed", (), None)
    context = None
    with Flask(__name__).test_request_context():
        g.request_id = "client-42"
        if sampler is None:
            RequestIdFilter().filter(record)
        else:
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
    line, _ = _line()
    assert "request_id=client-42 trace_id=- span_id=-: triton infer failed" in line


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


def test_failures_held_back_are_reported_once_calls_succeed_again(caplog):
    """A short outage ends before the next interval: the first success after it reports what was held back, once;
    successes inside the interval report nothing yet, and a later outage's first failure is logged at once."""
    clock = _Clock()
    throttled = Throttled(logging.getLogger("test.throttled"), 10.0, clock)
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        throttled.settle()  # nothing failed: nothing to say
        for _ in range(4):
            throttled.warning("UNAVAILABLE", "triton infer failed: status=%s", "UNAVAILABLE")
            clock.now += 0.5
        throttled.settle()  # 2 s after the first failure: still inside its interval
        clock.now += 8.5
        throttled.settle()
        throttled.settle()
        clock.now += 10
        throttled.settle()  # nothing held back since: forgotten
        throttled.warning("UNAVAILABLE", "triton infer failed: status=%s", "UNAVAILABLE")
    assert [record.getMessage() for record in caplog.records] == [
        "triton infer failed: status=UNAVAILABLE",
        "triton infer failed: status=UNAVAILABLE (3 like it held back in the last 10 s)",
        "triton infer failed: status=UNAVAILABLE",
    ]


def test_held_back_failures_reported_during_a_success_carry_none_of_its_ids():
    """The line settle() writes is about earlier requests: searching the successful request's id must not find it."""
    from flask import Flask, g

    logger = logging.getLogger("test.throttled.ids")
    logger.propagate = False
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    logger.addHandler(handler)
    clock = _Clock()
    throttled = Throttled(logger, 10.0, clock)
    try:
        with Flask(__name__).test_request_context():
            g.request_id = "the-failed-one"
            for _ in range(3):
                throttled.warning("UNAVAILABLE", "triton infer failed")
            g.request_id = "a-successful-one"
            clock.now += 11
            throttled.settle()
    finally:
        logger.removeHandler(handler)
    assert [(record.getMessage(), record.request_id) for record in seen] == [
        ("triton infer failed", "the-failed-one"),
        ("triton infer failed (2 like it held back in the last 11 s)", "-")]


def test_failures_mixed_with_successes_are_still_logged_once_per_interval(caplog):
    """A partly overloaded Triton: a 429 every 0.7 s, successes between them. Lines stay 10 s apart, and the counts
    they give add up to every failure."""
    clock = _Clock()
    throttled = Throttled(logging.getLogger("test.throttled"), 10.0, clock)
    logged_at = []
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(60):
            for call in (lambda: throttled.warning("RESOURCE_EXHAUSTED", "triton infer failed"), throttled.settle):
                before = len(caplog.records)
                call()
                logged_at += [clock.now] * (len(caplog.records) - before)
                clock.now += 0.35
    assert all(later - earlier >= 10.0 - 1e-9 for earlier, later in zip(logged_at, logged_at[1:]))
    counted = [1 if "like it" not in record.getMessage() else
               int(record.getMessage().split("(")[1].split()[0]) + ("more like it" in record.getMessage())
               for record in caplog.records]
    held_now = throttled._last["RESOURCE_EXHAUSTED"][1]
    assert sum(counted) + held_now == 60


def test_json_lines_carry_the_ids_and_keep_a_traceback_inside_the_line():
    record = logging.LogRecord("gateway.errors", logging.ERROR, __file__, 1, "failed %s", ("here",), None)
    record.request_id, record.trace_id, record.span_id = "client-42", "ab" * 16, "-"
    try:
        raise KeyError("secret")
    except KeyError:
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed here" and parsed["level"] == "ERROR" and parsed["logger"] == "gateway.errors"
    assert parsed["request_id"] == "client-42" and parsed["trace_id"] == "ab" * 16
    assert "span_id" not in parsed  # "-": none
    assert parsed["exception"].startswith("Traceback") and "KeyError" in parsed["exception"]
    assert parsed["ts"].endswith("Z") and parsed["pid"] == os.getpid()


@pytest.mark.triton
def test_a_json_gateway_writes_only_json_lines_keyed_by_request(gateway_stack, hopper_jpeg):
    """GATEWAY_LOG_FORMAT=json: gunicorn's lines, the app's warnings and the access log are each one JSON object
    a line, and the app's warning about a failed Triton call names the request it failed; gunicorn's own access
    log stays off."""
    env = gateway_stack.environment(free_port(), {
        "GATEWAY_WORKERS": "1", "GATEWAY_LOG_FORMAT": "json", "GATEWAY_ACCESS_LOG": "-",
        "GATEWAY_TRITON_URL": f"127.0.0.1:{free_port()}", "GATEWAY_TRITON_METRICS_URL": "off"})  # no Triton there
    gateway = Gunicorn(env, gateway_stack.log_dir / "json_log.log").start(ready_path="/healthz")
    try:
        refused = requests.post(gateway.url + "/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"},
                                timeout=60)
        assert refused.status_code == 503
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.strip()]  # each one JSON
    request_id = refused.headers["X-Request-ID"]
    assert any(line.get("logger") == "gunicorn.error" and "Booting worker" in line["message"] for line in lines)
    failed = [line for line in lines if line.get("message", "").startswith("triton infer failed")]
    assert len(failed) == 1 and failed[0]["request_id"] == request_id and failed[0]["level"] == "WARNING"
    logged = [line for line in lines if line.get("route") == "/v1/detect"]
    assert len(logged) == 1 and logged[0]["status"] == 503 and logged[0]["request_id"] == request_id
    assert not any(line.get("logger") == "gunicorn.access" for line in lines)
