"""Prometheus metrics: request count and latency per endpoint and status, merged across gunicorn workers."""
from __future__ import annotations

from flask import Blueprint, Flask, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from gateway.settings import Settings

EXTENSION_KEY = "prometheus_metrics"
METRICS_PREFIX = "gateway"
# Exposition and probes would only measure the scraper.
UNMEASURED_PATHS = ["^/metrics$", "^/healthz$", "^/readyz$"]

bp = Blueprint("metrics", __name__)


def register_metrics(app: Flask, settings: Settings) -> None:
    """Measure every request (the /metrics route below exposes them); under gunicorn (PROMETHEUS_MULTIPROC_DIR set) through the multiprocess files.

    Called from create_app, i.e. in each worker after fork: the registry is never built at import.
    `gateway_http_request_duration_seconds{method,endpoint,status}` is the latency histogram; its
    `_count` series counts requests by endpoint and status.
    """
    options = dict(group_by="endpoint", defaults_prefix=METRICS_PREFIX, excluded_paths=UNMEASURED_PATHS)
    if settings.prometheus_multiproc_dir:
        exporter = GunicornInternalPrometheusMetrics.for_app_factory(path=None, **options)
    else:
        exporter = PrometheusMetrics.for_app_factory(path=None, registry=CollectorRegistry(), **options)
    exporter.init_app(app)
    app.extensions[EXTENSION_KEY] = exporter


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition (OpenMetrics when the scraper asks for it)."""
    names = request.args.getlist("name[]") or None
    body, content_type = current_app.extensions[EXTENSION_KEY].generate_metrics(request.headers.get("Accept"), names)
    return body, 200, {"Content-Type": content_type}
