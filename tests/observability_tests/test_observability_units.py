"""The observability building blocks: Triton-metrics merge, cross-process exemplars, sampler and settings, and the
in-process Flask app's metrics, errors and access-log records on the session's real tritonserver."""
from __future__ import annotations

import json
import multiprocessing
import socket
import time
from collections import Counter

import cv2
import numpy as np
import pytest
import requests
from opentelemetry.sdk.trace import sampling
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from gateway import create_app, triton_metrics
from gateway.exemplars import ExemplarStore, bucket_bound
from gateway.metrics import STAGE_BUCKETS
from gateway.shared_memory import INLINE_REASONS
from gateway.settings import Settings, env_name
from gateway.tracing import build_sampler
from gateway.triton_client import close_worker_detectors
from gateway_helpers import FakeDetector, encode, free_port, server_like_client

# As tritonserver 2.51 writes it (abridged): counters without _total, a summary whose _count/_sum precede
# its quantiles, a gauge; plus an untyped sample.
TRITON_TEXT = """# HELP nv_inference_count Number of inferences performed (does not include cached requests)
# TYPE nv_inference_count counter
nv_inference_count{model="mask_detection",version="1"} 3
nv_inference_count{model="face_detector",version="1"} 3
# HELP nv_inference_request_summary_us Summary of inference request duration in microseconds
# TYPE nv_inference_request_summary_us summary
nv_inference_request_summary_us_count{model="mask_detection",version="1"} 1
nv_inference_request_summary_us_sum{model="mask_detection",version="1"} 233604
nv_inference_request_summary_us{model="mask_detection",version="1",quantile="0.5"} 233604
# HELP nv_cpu_utilization CPU utilization rate [0.0 - 1.0]
# TYPE nv_cpu_utilization gauge
nv_cpu_utilization 0.25
loose_sample{a="b"} NaN
"""


# --------------------------------------------------------------------------- Triton's families
def test_triton_text_is_grouped_and_rendered_unchanged():
    families = triton_metrics.parse(TRITON_TEXT)
    assert [(f.name, f.type) for f in families] == [
        ("nv_inference_count", "counter"), ("nv_inference_request_summary_us", "summary"),
        ("nv_cpu_utilization", "gauge"), ("loose_sample", "untyped")]
    assert triton_metrics.render_text(families[:3]) == TRITON_TEXT.split("loose_sample")[0]
    parsed = {f.name: f for f in parse_text(triton_metrics.render_text(families))}
    assert parsed["nv_inference_request_summary_us"].type == "summary"


def test_triton_families_as_openmetrics_keep_their_series_names():
    text = triton_metrics.render_openmetrics(triton_metrics.parse(TRITON_TEXT)) + "# EOF\n"
    families = {f.name: f for f in parse_openmetrics(text)}  # strict parser: a malformed line raises
    assert families["nv_inference_count"].type == "unknown"  # an OpenMetrics counter would need _total
    assert {s.name for s in families["nv_inference_count"].samples} == {"nv_inference_count"}
    assert families["nv_inference_request_summary_us"].type == "summary"
    assert "loose_sample{a=\"b\"} NaN" in text


def test_a_family_the_gateway_already_has_is_dropped():
    families = triton_metrics.parse(TRITON_TEXT)
    kept = triton_metrics.without_names(families, {"nv_cpu_utilization", "loose_sample"})
    assert [f.name for f in kept] == ["nv_inference_count", "nv_inference_request_summary_us"]
    doubled = triton_metrics.parse(TRITON_TEXT + TRITON_TEXT.split("# HELP nv_cpu")[0])
    assert [f.name for f in doubled].count("nv_inference_count") == 1


def test_fetch_fails_fast_when_refused_and_within_the_timeout_when_hung():
    """A down Triton must not cost a scrape the whole timeout; a hung one must cost it no more than about that."""
    refused_timeout_s = 20.0
    started = time.monotonic()
    refused = triton_metrics.fetch(f"http://127.0.0.1:{free_port()}/metrics", refused_timeout_s)
    assert not refused.ok and "refused" in refused.error.lower()
    assert time.monotonic() - started < refused_timeout_s / 2  # it did not wait for the timeout
    hung_timeout_s = 0.5
    with socket.socket() as hung:  # accepts connections (the backlog) but never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(4)
        started = time.monotonic()
        result = triton_metrics.fetch(f"http://127.0.0.1:{hung.getsockname()[1]}/metrics", hung_timeout_s)
        elapsed = time.monotonic() - started
    assert not result.ok and "timed out" in result.error.lower()
    assert elapsed >= hung_timeout_s * 0.9  # it waited for the answer until the timeout ...
    assert elapsed < 30  # ... and gave up (a hang guard, not a speed limit)


# --------------------------------------------------------------------------- exemplars
def test_bucket_bound_is_the_bucket_prometheus_counts_the_value_in():
    assert bucket_bound(0.05, STAGE_BUCKETS) == "0.05"  # le is inclusive
    assert bucket_bound(0.0501, STAGE_BUCKETS) == "0.075"
    assert bucket_bound(99.0, STAGE_BUCKETS) == "+Inf"


def _record_in_child(directory, trace_id):
    store = ExemplarStore(directory)
    store.record("gateway_stage_duration_seconds", {"stage": "total"}, STAGE_BUCKETS, 0.2, trace_id)
    store.flush()


def test_exemplars_of_another_worker_process_are_attached(tmp_path):
    child = multiprocessing.get_context("fork").Process(target=_record_in_child, args=(str(tmp_path), "a" * 32))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    mine = ExemplarStore(str(tmp_path))
    mine.record("gateway_stage_duration_seconds", {"stage": "decode"}, STAGE_BUCKETS, 0.002, "b" * 32)
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    histogram = Histogram("gateway_stage_duration_seconds", "x", ["stage"], buckets=STAGE_BUCKETS, registry=registry)
    histogram.labels(stage="total").observe(0.2)
    histogram.labels(stage="decode").observe(0.002)
    families = mine.attach(registry.collect())
    exemplars = {(s.labels["stage"], s.labels["le"]): s.exemplar.labels["trace_id"]
                 for f in families for s in f.samples if s.exemplar is not None}
    assert exemplars == {("total", "0.2"): "a" * 32, ("decode", "0.0025"): "b" * 32}


# --------------------------------------------------------------------------- settings and sampler
def test_the_request_clock_keeps_the_oldest_request_in_flight_and_the_last_answer():
    """Requests end in any order: the gauge follows the oldest still running, and reads 0 once none is."""
    from prometheus_client import CollectorRegistry

    from gateway.metrics import RequestClock, ServiceMetrics

    now = [100.0]
    registry = CollectorRegistry()
    clock = RequestClock(ServiceMetrics(registry, ExemplarStore(None)), clock=lambda: now[0])

    def gauges():
        return (registry.get_sample_value("gateway_worker_oldest_request_start_timestamp_seconds"),
                registry.get_sample_value("gateway_worker_last_answer_timestamp_seconds"))

    def start_at(when: float) -> int:
        now[0] = when
        return clock.start()

    assert gauges() == (0, 100.0)  # nothing in flight; as fresh as its start
    first, second, third = start_at(110.0), start_at(120.0), start_at(130.0)
    assert gauges() == (110.0, 100.0)
    now[0] = 140.0
    clock.end(second)  # a younger one ends: the oldest is still the first
    assert gauges() == (110.0, 140.0)
    now[0] = 150.0
    clock.end(first)
    assert gauges() == (130.0, 150.0)
    clock.end(first)  # ended twice (a teardown and a close): nothing changes
    assert gauges() == (130.0, 150.0)
    now[0] = 160.0
    clock.end(third)
    assert gauges() == (0, 160.0)


def test_standard_otel_variables_are_read_by_settings():
    settings = Settings.from_env({"OTEL_SERVICE_NAME": "svc", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                                  "OTEL_TRACES_SAMPLER_ARG": "0.25",
                                  "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
                                  "GATEWAY_TRITON_METRICS_URL": "http://t:8002/metrics"})
    assert (settings.service_name, settings.traces_sampler, settings.traces_sampler_arg) == (
        "svc", "parentbased_traceidratio", "0.25")
    assert settings.traces_exported and settings.triton_metrics_url == "http://t:8002/metrics"
    assert env_name("triton_metrics_url") == "GATEWAY_TRITON_METRICS_URL"
    assert not Settings(triton_metrics_url="off").triton_metrics_merged


def test_sampler_choice():
    assert build_sampler(Settings()) is sampling.DEFAULT_OFF  # no exporter: only a caller's sampled trace
    assert build_sampler(Settings(otlp_endpoint="http://c:4318")) is sampling.DEFAULT_ON
    ratio = build_sampler(Settings(traces_sampler="parentbased_traceidratio", traces_sampler_arg="0.25"))
    assert isinstance(ratio, sampling.ParentBasedTraceIdRatio) and "0.25" in ratio.get_description()
    assert build_sampler(Settings(traces_sampler="always_off")) is sampling.ALWAYS_OFF
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        build_sampler(Settings(traces_sampler="sometimes"))
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        build_sampler(Settings(traces_sampler="traceidratio", traces_sampler_arg="2"))


# --------------------------------------------------------------------------- the app's /metrics
@pytest.fixture(scope="module", autouse=True)
def _close_real_clients():
    """The app's per-process Triton clients are closed after the module, so their shared memory is given back."""
    yield
    close_worker_detectors()


@pytest.fixture(scope="module")
def hopper(real_images, reference_pipeline):
    """grace_hopper as a JPEG upload, its decoded pixels and the reference's labels for them."""
    jpeg = encode(real_images["grace_hopper"], ".jpg")
    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return jpeg, pixels, Counter(reference_pipeline.detect(pixels).labels)


def _app(observed_stack, **settings):
    """The app in process on the session's real Triton (its gRPC and metrics ports); no access log unless asked."""
    triton = observed_stack.triton
    values = {"triton_url": triton.grpc_url, "triton_metrics_url": triton.metrics_url, "access_log": "off"}
    return create_app({"SETTINGS": Settings(**{**values, **settings})})


@pytest.mark.triton
def test_an_image_sent_inline_with_shared_memory_on_is_counted_by_reason(observed_stack, hopper, monkeypatch):
    """Every region in use (a pool of one, held here as by a request in flight): the image goes inline, counted
    under pool_full beside the grpc transport; the next one, with the region free, goes through shared memory."""
    from gateway import shared_memory
    from gateway.triton_client import TritonDetector

    monkeypatch.setattr(shared_memory, "MAX_REGIONS_PER_WORKER", 1)
    jpeg = hopper[0]
    app = _app(observed_stack)
    detector = TritonDetector(app.config["SETTINGS"])
    app.config["DETECTOR"] = detector
    client = server_like_client(app)
    try:
        with detector._regions.lease():
            assert client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
        assert client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
    finally:
        detector.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in parse_text(client.get("/metrics").get_data(as_text=True)) for s in family.samples}
    assert {labels: value for (name, labels), value in samples.items()
            if name == "gateway_triton_inline_fallbacks_total" and value} == {(("reason", "pool_full"),): 1}
    assert samples[("gateway_triton_requests_total", (("transport", "grpc"),))] == 1
    assert samples[("gateway_triton_requests_total", (("transport", "system_shared_memory"),))] == 1


def _settled_inference_count(metrics_url: str) -> str:
    """Triton's `mask_detection` count line once it stops moving: Triton counts a request just after answering it."""
    previous = None
    for _ in range(50):
        line = next(line for line in requests.get(metrics_url, timeout=10).text.splitlines()
                    if line.startswith('nv_inference_count{model="mask_detection"'))
        if line == previous:
            return line
        previous = line
        time.sleep(0.2)
    raise AssertionError(f"Triton's inference count kept moving: {previous}")


@pytest.mark.triton
def test_app_metrics_merge_triton_and_count_requests_errors_and_images(observed_stack, hopper):
    jpeg, pixels, labelled = hopper
    client = server_like_client(_app(observed_stack, traces_sampler="always_on"))
    assert client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
    assert client.post("/v1/detect", data=b"xx", headers={"Content-Type": "image/jpeg"}).status_code == 400
    counted = _settled_inference_count(observed_stack.triton.metrics_url)
    text = client.get("/metrics").get_data(as_text=True)
    families = {f.name: f for f in parse_text(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("flask_http_request_total", (("method", "POST"), ("status", "200")))] == 1
    assert samples[("flask_http_request_duration_seconds_count",
                    (("endpoint", "api.detect"), ("method", "POST"), ("status", "400")))] == 1
    assert samples[("gateway_errors_total", (("code", "invalid_image"), ("kind", "client")))] == 1
    assert samples[("gateway_errors_total", (("code", "triton_unreachable"), ("kind", "upstream")))] == 0
    assert sum(labelled.values()) >= 1
    assert samples[("gateway_detections_total", (("label", "no_mask"),))] == labelled["no_mask"]
    assert samples[("gateway_detections_total", (("label", "mask"),))] == labelled["mask"]
    # this app and the session's Triton share /dev/shm: the one image went through shared memory
    assert samples[("gateway_triton_requests_total", (("transport", "system_shared_memory"),))] == 1
    assert samples[("gateway_triton_requests_total", (("transport", "grpc"),))] == 0
    fallbacks = {labels: value for (name, labels), value in samples.items()
                 if name == "gateway_triton_inline_fallbacks_total"}
    assert fallbacks == {(("reason", reason),): 0 for reason in INLINE_REASONS}
    assert samples[("gateway_image_pixels_sum", ())] == pixels.shape[0] * pixels.shape[1]
    assert samples[("gateway_faces_per_image_count", ())] == 1
    assert samples[("gateway_faces_per_image_sum", ())] == sum(labelled.values())
    assert {stage for (name, labels) in samples if name == "gateway_stage_duration_seconds_count"
            for key, stage in labels} == {"decode", "triton", "encode", "total"}
    assert samples[("gateway_stage_duration_seconds_count", (("stage", "total"),))] == 1  # not the caller's 400
    assert samples[("gateway_triton_metrics_up", ())] == 1
    assert counted + "\n" in text  # as Triton wrote it
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))  # each family once, Triton's beside the gateway's
    assert samples[("gateway_inflight_requests", ())] == 0
    openmetrics = client.get("/metrics", headers={"Accept": "application/openmetrics-text;version=1.0.0"})
    parsed = {f.name: f for f in parse_openmetrics(openmetrics.get_data(as_text=True))}
    assert "nv_inference_count" in parsed
    with_exemplar = [s for s in parsed["gateway_stage_duration_seconds"].samples if s.exemplar]
    assert {s.labels["stage"] for s in with_exemplar} == {"decode", "triton", "encode", "total"}
    assert len({s.exemplar.labels["trace_id"] for s in with_exemplar}) == 1  # the 400 observes no stage at all
    assert all(s.exemplar.value <= float(s.labels["le"]) for s in with_exemplar)


def test_only_scrapes_and_probes_go_untraced():
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.tracing import PROVIDER_KEY

    app = create_app({"SETTINGS": Settings(service_name="untraced-paths", traces_sampler="always_on",
                                           triton_metrics_url="off", access_log="off")})
    spans = InMemorySpanExporter()
    app.extensions[PROVIDER_KEY].add_span_processor(SimpleSpanProcessor(spans))
    client = server_like_client(app)
    for path in ("/healthz", "/readyz?verbose=1", "/metrics"):
        client.get(path)
    assert spans.get_finished_spans() == ()
    # a path or query that merely mentions one of them is an ordinary request (OpenTelemetry searches the URL)
    client.post("/v1/detect?tag=healthz", data=b"", headers={"Content-Type": "image/jpeg"})
    client.get("/v1/metrics-and-more")
    assert [span.name for span in spans.get_finished_spans()] == ["POST /v1/detect", "GET /v1/metrics-and-more"]


def test_an_invented_method_is_refused_before_it_can_become_a_metric_label():
    client = server_like_client(create_app({"SETTINGS": Settings(triton_metrics_url="off", access_log="off")}))
    for method in ("QWERTY", "ZXCVBN", "PUT"):
        client.open("/v1/detect", method=method)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'method="PUT",status="405"' in text  # a method HTTP defines is still measured, and Flask's 405
    assert "QWERTY" not in text and "ZXCVBN" not in text
    assert 'gateway_errors_total{code="method_not_implemented",kind="client"} 2.0' in text  # in one fixed series
    # werkzeug's own client errors exist from the start, so a panel on them reads 0, not "no data"
    assert 'gateway_errors_total{code="not_found",kind="client"} 0.0' in text
    assert 'gateway_errors_total{code="bad_request",kind="client"} 0.0' in text


def test_unhandled_exceptions_are_counted_and_answered_as_internal_error():
    # The fake: no real Triton call raises a KeyError, which the catch-all must answer and count.
    client = server_like_client(create_app({"SETTINGS": Settings(triton_metrics_url="off", access_log="off"),
                                            "DETECTOR": FakeDetector(fail_with=KeyError("secret"))}))
    response = client.post("/v1/detect", data=encode(np.full((50, 50, 3), 9, np.uint8), ".jpg"),
                           headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 500 and response.get_json()["error"]["code"] == "internal_error"
    text = client.get("/metrics").get_data(as_text=True)
    assert 'flask_http_request_exceptions_total{method="POST",status="500"} 1.0' in text
    assert 'gateway_errors_total{code="internal_error",kind="internal"} 1.0' in text
    assert "gateway_triton_metrics_up" not in text  # the merge is off


def test_the_latency_slo_counts_the_services_failures_but_not_the_callers_mistakes():
    """stage="total" feeds the latency SLO: an internal error is the service's failure and counts; the caller's 4xx
    do not. The fake raises the KeyError no real Triton call does (Triton's real 429s are counted in
    test_gateway_outage.py's full-queue test)."""
    image = encode(np.full((50, 50, 3), 9, np.uint8), ".jpg")
    total = 'gateway_stage_duration_seconds_count{stage="total"}'
    for detector, status, counted in ((FakeDetector(KeyError("secret")), 500, 1), (None, 415, 0)):
        config = {"SETTINGS": Settings(triton_metrics_url="off", access_log="off")}
        client = server_like_client(create_app({**config, "DETECTOR": detector} if detector else config))
        content_type = "image/jpeg" if detector else "text/plain"
        assert client.post("/v1/detect", data=image, headers={"Content-Type": content_type}).status_code == status
        lines = [line for line in client.get("/metrics").get_data(as_text=True).splitlines() if line.startswith(total)]
        assert lines == ([f"{total} {counted:.1f}"] if counted else []), status


@pytest.mark.triton
def test_no_exemplar_without_a_sampled_trace(observed_stack, hopper):
    client = server_like_client(_app(observed_stack))  # no exporter, no caller context: nothing sampled
    response = client.post("/v1/detect", data=hopper[0], headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
    text = client.get("/metrics", headers={"Accept": "application/openmetrics-text"}).get_data(as_text=True)
    assert "gateway_stage_duration_seconds_bucket" in text and "trace_id" not in text


@pytest.mark.triton
def test_access_record_has_the_keys_log_analysis_reads(observed_stack, real_images, reference_pipeline, tmp_path):
    log = tmp_path / "access.log"
    client = server_like_client(_app(observed_stack, triton_metrics_url="off", access_log=str(log)))
    image = real_images["grace_hopper"]
    client.post("/v1/detect", data=encode(image, ".png"),
                headers={"Content-Type": "image/png", "X-Request-ID": "req-1",
                         "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    client.get("/healthz")  # probes are not logged
    client.post("/v1/detect", data=b"", headers={"Content-Type": "image/png"})
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["request_id"] == "req-1" and first["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    faces = len(reference_pipeline.detect(image))
    assert faces >= 1
    assert (first["route"], first["method"], first["status"], first["image_width"], first["image_height"],
            first["faces"], first["error_code"]) == ("/v1/detect", "POST", 200, 512, 600, faces, None)
    assert first["ts"].endswith("Z") and first["duration_ms"] > 0
    assert second["status"] == 400 and second["error_code"] == "empty_body" and second["trace_id"] is None


@pytest.mark.parametrize("sampler", ["parentbased_always_on", "parentbased_traceidratio", "traceidratio"])
def test_stage_and_triton_spans_are_made_only_under_a_sampled_request_span(sampler):
    """Under a sampled request span the stages and the Triton call are its recorded children; under an unsampled
    one nothing is made (no sampler here could sample such a child) and Triton is sent no trace context."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.tracing import PROVIDER_KEY, stage_span, triton_call_span, triton_trace_headers

    settings = Settings(service_name="stage-spans", traces_sampler=sampler, traces_sampler_arg="1.0",
                        triton_metrics_url="off", access_log="off")
    app = create_app({"SETTINGS": settings})
    spans = InMemorySpanExporter()
    app.extensions[PROVIDER_KEY].add_span_processor(SimpleSpanProcessor(spans))
    for sampled in (True, False):
        parent = trace.NonRecordingSpan(trace.SpanContext(
            0x4BF92F3577B34DA6A3CE929D0E0E4736 + sampled, 0x00F067AA0BA902B7, is_remote=False,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)))
        with app.app_context(), trace.use_span(parent):
            with stage_span("decode", **{"image.bytes": 10}) as decode:
                assert decode.is_recording() is sampled
            with triton_call_span(settings) as call:
                headers = triton_trace_headers()
                assert call.is_recording() is sampled
            assert (headers is not None) is sampled
            if sampled:
                sampled_headers = headers
            else:  # nothing new became current: the request's own span is still what Triton would see
                assert decode is trace.INVALID_SPAN and call is trace.INVALID_SPAN
    finished = spans.get_finished_spans()
    assert [span.name for span in finished] == ["decode", "inference.GRPCInferenceService/ModelInfer"]
    assert all(span.parent.span_id == 0x00F067AA0BA902B7 for span in finished)
    assert f"-{finished[1].context.span_id:016x}-01" in sampled_headers["traceparent"]  # Triton's parent: the call


def test_work_after_the_response_runs_when_the_server_closes_it_and_one_failure_spares_the_rest(caplog):
    """The access-log line and metric updates wait for the server's close(): the caller has its answer by then."""
    from flask import Flask

    from gateway.after_response import after_response, register_after_response

    app, done = Flask(__name__), []
    register_after_response(app)

    @app.get("/work")
    def work():
        after_response(lambda: done.append("first"))
        after_response(lambda: 1 / 0)
        after_response(lambda: done.append("third"))
        return {"answered": True}

    response = app.test_client().get("/work")  # not closed yet: what a server holds between write and close()
    assert response.get_json() == {"answered": True} and done == []
    response.close()
    assert done == ["first", "third"]
    assert "work after the answer to request" in caplog.text and "ZeroDivisionError" in caplog.text


def test_the_access_log_line_and_request_metrics_are_written_when_the_answer_is_closed(tmp_path):
    """In the app as create_app wires it (hook order included): nothing before the server's close(), all after."""
    log = tmp_path / "access.log"
    app = create_app({"SETTINGS": Settings(triton_metrics_url="off", access_log=str(log),
                                            triton_url=f"127.0.0.1:{free_port()}")})  # nothing listens there
    total = 'gateway_stage_duration_seconds_count{stage="total"}'

    def totals() -> str:
        return next((line for line in server_like_client(app).get("/metrics").get_data(as_text=True).splitlines()
                     if line.startswith(total)), "")

    response = app.test_client().post("/v1/detect", data=b"xx", headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "invalid_image"
    assert log.read_text() == ""  # nothing logged yet
    response.close()
    (line,) = log.read_text().splitlines()
    assert json.loads(line)["error_code"] == "invalid_image"
    assert totals() == ""  # the caller's mistake is not part of the latency SLO's `total`

    image = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))[1].tobytes()
    response = app.test_client().post("/v1/detect", data=image, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "triton_unreachable"
    assert len(log.read_text().splitlines()) == 1 and totals() == ""  # the service's own failure: not yet ...
    response.close()
    assert json.loads(log.read_text().splitlines()[-1])["error_code"] == "triton_unreachable"
    assert totals() == f"{total} 1.0"  # ... and counted once the answer is closed
