"""Prometheus `/metrics`: the gateway's HTTP and service metrics, merged across gunicorn workers, plus Triton's.

One scrape of this endpoint gives every family the rules and dashboards read: prometheus-flask-exporter's
`flask_http_*`, the service's `gateway_*` (gateway/metrics.py) with trace-id exemplars in the OpenMetrics
format (gateway/exemplars.py), and Triton's `nv_*`, fetched from Triton's metrics port during the scrape
(gateway/triton_metrics.py); `gateway_triton_metrics_up` says whether that fetch worked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from gateway.after_response import after_response
from gateway.exemplars import ExemplarStore
from gateway.exposition import Exposition
from gateway.metrics import RequestClock, ServiceMetrics
from gateway.operational import OPERATIONAL_PATHS
from gateway.settings import Settings

EXTENSION_KEY = "gateway_metrics"
METRICS_PREFIX = "flask"  # prometheus-flask-exporter's default: flask_http_request_total, ... (compose/ reads these)

bp = Blueprint("metrics", __name__)


@dataclass
class MetricsState:
    service: ServiceMetrics
    exposition: Exposition


def register_metrics(app: Flask, settings: Settings) -> None:
    """Measure every request but scrapes and probes; under gunicorn (PROMETHEUS_MULTIPROC_DIR) in multiprocess files.

    Called from create_app, i.e. in each worker after fork: nothing is built at import.
    `flask_http_request_duration_seconds{method,endpoint,status}` is the HTTP latency histogram (its `_count`
    counts requests by endpoint and status), `flask_http_request_total{method,status}` the request counter.
    """
    excluded = [f"^{re.escape(path)}$" for path in sorted(OPERATIONAL_PATHS)]
    options = dict(group_by="endpoint", defaults_prefix=METRICS_PREFIX, excluded_paths=excluded)
    multiprocess = bool(settings.prometheus_multiproc_dir)
    registry = None if multiprocess else CollectorRegistry()
    if multiprocess:
        exporter = GunicornInternalPrometheusMetrics.for_app_factory(path=None, **options)
    else:
        exporter = PrometheusMetrics.for_app_factory(path=None, registry=registry, **options)
    exporter.init_app(app)
    exemplars = ExemplarStore(settings.prometheus_multiproc_dir or None)
    service = ServiceMetrics(registry, exemplars)
    service.worker_threads.set(settings.threads)  # this worker's share of the capacity; livesum adds the workers
    clock = RequestClock(service)
    app.extensions[EXTENSION_KEY] = MetricsState(service, Exposition(settings, registry, exemplars))

    @app.before_request
    def _count_in_flight():
        if request.path not in OPERATIONAL_PATHS:
            service.inflight.inc()
            g.counted_in_flight = True
            token = clock.start()
            after_response(lambda: clock.end(token))  # once the answer is written: a blocked write counts too

    @app.after_request
    def _count_error(response):
        if request.path not in OPERATIONAL_PATHS and g.get("error_code"):
            service.count_error(g.error_code, g.error_kind)
        return response

    @app.teardown_request
    def _done_in_flight(_exception):
        if g.pop("counted_in_flight", False):
            service.inflight.dec()


def service_metrics() -> ServiceMetrics:
    """The running app's service metrics (gateway/metrics.py)."""
    return app_service_metrics(current_app)


def app_service_metrics(app: Flask) -> ServiceMetrics:
    """`app`'s service metrics, for code in front of the app that runs outside its context."""
    return app.extensions[EXTENSION_KEY].service


def exposition(accept: str | None, names: list[str] | None = None) -> tuple[str, str]:
    """The merged exposition in the format the scraper asked for (OpenMetrics carries the exemplars)."""
    return current_app.extensions[EXTENSION_KEY].exposition.render(accept, names)


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition, or OpenMetrics (with exemplars) when the scraper asks for it."""
    body, content_type = exposition(request.headers.get("Accept"), request.args.getlist("name[]") or None)
    return Response(body, 200, {"Content-Type": content_type})
