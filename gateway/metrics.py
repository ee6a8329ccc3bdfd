"""The service's own Prometheus metrics (the HTTP ones come from prometheus-flask-exporter).

Names and labels are a contract with compose/prometheus/rules/ and compose/grafana/dashboards/ (see
compose/dashboards.py, GATEWAY_*): rename both sides together. Created per app (in each gunicorn worker,
after fork); under gunicorn they live in prometheus_client's multiprocess files and are merged at scrape time.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.errors import HTTP_STATUS, WERKZEUG_CLIENT_ERRORS, ApiError, error_kind, http_error_code
from gateway.exemplars import ExemplarStore
from gateway.shared_memory import INLINE_REASONS
from gateway.triton_client import INLINE_TRANSPORT, SHARED_MEMORY_TRANSPORT

# What the mask classifier answers (model_repository/postprocess config `labels`); both are created at zero,
# so ratios such as the mask share read 0, not "no data", before the first face of a kind.
DETECTION_LABELS = ("mask", "no_mask")
TRITON_TRANSPORTS = (SHARED_MEMORY_TRANSPORT, INLINE_TRANSPORT)  # how the pixels of a Triton call travelled

# Seconds: a decode takes about a millisecond, a Triton round trip tens to hundreds, the SLO is 500 ms.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5,
                 5.0, 10.0, float("inf"))
FACES_BUCKETS = (0, 1, 2, 3, 4, 5, 8, 12, 20, 50, float("inf"))
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0, float("inf"))
PIXEL_BUCKETS = (64 * 64, 320 * 240, 640 * 480, 1280 * 720, 1920 * 1080, 2560 * 1440, 3840 * 2160, 16_000_000,
                 40_000_000, float("inf"))  # up to the default GATEWAY_MAX_PIXELS


class ServiceMetrics:
    """The gateway's business and latency metrics; `registry` is None in multiprocess mode (files, not a registry)."""

    def __init__(self, registry: CollectorRegistry | None, exemplars: ExemplarStore):
        self.exemplars = exemplars
        self.inflight = Gauge("gateway_inflight_requests", "Requests being served now (all workers)",
                              registry=registry, multiprocess_mode="livesum")
        self.worker_threads = Gauge(
            "gateway_worker_threads", "Request threads of the live workers (GATEWAY_THREADS each): at this many "
            "requests in flight, the next ones wait in gunicorn's queue, where no latency metric sees them",
            registry=registry, multiprocess_mode="livesum")
        # Per worker (a `pid` label under gunicorn): how long its oldest request has been running, and when it last
        # answered one. Only events write a gauge, so they hold timestamps and the age is computed at query time.
        self.oldest_request_start = Gauge(
            "gateway_worker_oldest_request_start_timestamp_seconds", "Unix time the worker's oldest request in flight "
            "started (0: none in flight); a request ends once its answer is written", registry=registry,
            multiprocess_mode="liveall")
        self.last_answer = Gauge(
            "gateway_worker_last_answer_timestamp_seconds", "Unix time the worker last finished writing an answer "
            "(its start time until then)", registry=registry, multiprocess_mode="liveall")
        self.stage_duration = Histogram(
            "gateway_stage_duration_seconds",
            "Time per stage of a detection request: decode (image), triton (the gRPC round trip, failed or not), "
            "encode (the answer) and total (the whole request, the caller's errors excepted); exemplars carry the "
            "trace id",
            ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        self.faces_per_image = Histogram("gateway_faces_per_image", "Faces found per image", buckets=FACES_BUCKETS,
                                         registry=registry)
        self.detections = Counter("gateway_detections", "Labelled faces by classifier label", ["label"],
                                  registry=registry)
        self.confidence = Histogram("gateway_detection_confidence", "Classifier confidence of each labelled face",
                                    buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.image_pixels = Histogram("gateway_image_pixels", "Decoded image width x height, before downscaling",
                                      buckets=PIXEL_BUCKETS, registry=registry)
        self.errors = Counter("gateway_errors", "Error answers by code (a failed image of a batch included)",
                              ["code", "kind"], registry=registry)
        self.triton_requests = Counter(
            "gateway_triton_requests", "Successful Triton calls by how the pixels travelled: system_shared_memory "
            "(GATEWAY_TRITON_SHARED_MEMORY=system) or grpc (inside the request)", ["transport"], registry=registry)
        self.inline_fallbacks = Counter(
            "gateway_triton_inline_fallbacks", "Successful Triton calls whose pixels went inside the request although "
            "GATEWAY_TRITON_SHARED_MEMORY=system, by reason: for good, shm_unusable (this host's /dev/shm) or "
            "unmappable (Triton cannot open the regions); for that image, create_failed (out of descriptors or "
            "memory), pool_full (every region in use) or too_large", ["reason"], registry=registry)
        for transport in TRITON_TRANSPORTS:
            self.triton_requests.labels(transport=transport)
        for reason in INLINE_REASONS:
            self.inline_fallbacks.labels(reason=reason)
        for label in DETECTION_LABELS:
            self.detections.labels(label=label)
        for error_class, status in HTTP_STATUS.items():
            self.errors.labels(code=error_class.code, kind=error_kind(error_class("x"), status))
        for werkzeug_error in WERKZEUG_CLIENT_ERRORS:
            self.errors.labels(code=http_error_code(werkzeug_error()), kind="client")
        self.errors.labels(code=ApiError.code, kind="internal")

    def observe_stage(self, stage: str, seconds: float, trace_id: str | None) -> None:
        """One stage's duration; a sampled request's trace id becomes the exemplar of its bucket."""
        self.stage_duration.labels(stage=stage).observe(seconds)
        if trace_id:
            self.exemplars.record("gateway_stage_duration_seconds", {"stage": stage}, STAGE_BUCKETS, seconds, trace_id)

    def observe_image(self, width: int, height: int, labels: Sequence[str], confidences: Sequence[float],
                      transport: str, inline_reason: str | None = None) -> None:
        """What one successfully processed image contained, and how (and, if inline, why) its pixels reached Triton."""
        self.triton_requests.labels(transport=transport).inc()
        if inline_reason is not None:
            self.inline_fallbacks.labels(reason=inline_reason).inc()
        self.image_pixels.observe(width * height)
        self.faces_per_image.observe(len(labels))
        for label, confidence in zip(labels, confidences):
            self.detections.labels(label=label).inc()
            self.confidence.observe(float(confidence))

    def count_error(self, code: str, kind: str) -> None:
        self.errors.labels(code=code, kind=kind).inc()


class RequestClock:
    """This worker's requests in flight, oldest first, kept in the per-worker gauges a stuck request shows in."""

    def __init__(self, metrics: ServiceMetrics, clock=time.time):
        self._metrics, self._clock = metrics, clock
        self._lock = threading.Lock()
        self._started: dict[int, float] = {}  # token -> start time, in start order
        self._tokens = itertools.count()
        metrics.oldest_request_start.set(0)
        metrics.last_answer.set(clock())  # a worker that has answered nothing yet is as fresh as its start

    def start(self) -> int:
        """A request began: returns the token `end` takes."""
        now = self._clock()
        with self._lock:
            token = next(self._tokens)
            self._started[token] = now
            if len(self._started) == 1:
                self._metrics.oldest_request_start.set(now)
        return token

    def end(self, token: int) -> None:
        """The request's answer is written (or it failed): the next oldest becomes the one to watch."""
        now = self._clock()
        with self._lock:
            if self._started.pop(token, None) is None:
                return
            self._metrics.oldest_request_start.set(next(iter(self._started.values()), 0))
            self._metrics.last_answer.set(now)
