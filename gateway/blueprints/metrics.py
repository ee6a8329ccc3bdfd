"""Prometheus `/metrics`: the gateway's HTTP and service metrics, merged across gunicorn workers, plus Triton's.

One scrape of this endpoint gives every family the rules and dashboards read: prometheus-flask-exporter's
`flask_http_*`, the service's `gateway_*` (gateway/metrics.py) with trace-id exemplars in the OpenMetrics
format (gateway/exemplars.py), and Triton's `nv_*`, fetched from Triton's metrics port during the scrape
(gateway/triton_metrics.py); `gateway_triton_metrics_up` says whether that fetch worked.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_flask_exporter import PrometheusMetrics
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

from gateway import triton_metrics
from gateway.exemplars import ExemplarStore
from gateway.metrics import ServiceMetrics
from gateway.operational import OPERATIONAL_PATHS
from gateway.settings import Settings

log = logging.getLogger(__name__)

EXTENSION_KEY = "gateway_metrics"
METRICS_PREFIX = "flask"  # prometheus-flask-exporter's default: flask_http_request_total, ... (compose/ reads these)
OPENMETRICS = "application/openmetrics-text"
EOF_LINE = "# EOF\n"

bp = Blueprint("metrics", __name__)


@dataclass
class MetricsState:
    settings: Settings
    service: ServiceMetrics
    registry: CollectorRegistry | None  # None in multiprocess mode: the values live in files
    triton_was_up: bool | None = None  # to log a change of Triton's metrics reachability once, not every scrape


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
    service = ServiceMetrics(registry, ExemplarStore(settings.prometheus_multiproc_dir or None))
    app.extensions[EXTENSION_KEY] = MetricsState(settings, service, registry)

    @app.before_request
    def _count_in_flight():
        if request.path not in OPERATIONAL_PATHS:
            service.inflight.inc()
            g.counted_in_flight = True

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


class _Families:
    """A fixed list of metric families in the shape prometheus_client's encoders read (a `collect()`)."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return iter(self._families)


def _gateway_families(state: MetricsState) -> list:
    if state.registry is None:
        from prometheus_client.multiprocess import MultiProcessCollector

        families = list(MultiProcessCollector(None, path=state.settings.prometheus_multiproc_dir).collect())
    else:
        families = list(state.registry.collect())
    return state.service.exemplars.attach(families)


def _triton_part(state: MetricsState, families: list) -> list[triton_metrics.Family]:
    """Fetch Triton's families and add `gateway_triton_metrics_up` to the gateway's."""
    scrape = triton_metrics.fetch(state.settings.triton_metrics_url, state.settings.triton_metrics_timeout_s)
    families.append(GaugeMetricFamily("gateway_triton_metrics_up",
                                      "1 when Triton's metrics were fetched and merged into this scrape, else 0",
                                      value=1.0 if scrape.ok else 0.0))
    if scrape.ok != state.triton_was_up:
        if scrape.ok:
            log.info("Triton metrics at %s merged into /metrics", state.settings.triton_metrics_url)
        else:
            log.warning("Triton metrics at %s unavailable (%s); /metrics carries the gateway's only",
                        state.settings.triton_metrics_url, scrape.error)
        state.triton_was_up = scrape.ok
    return scrape.families


def _names_of(families) -> set[str]:
    names = set()
    for family in families:
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


def exposition(accept: str | None, names: list[str] | None = None) -> tuple[str, str]:
    """The merged exposition in the format the scraper asked for (OpenMetrics carries the exemplars)."""
    state: MetricsState = current_app.extensions[EXTENSION_KEY]
    families = _gateway_families(state)
    triton = _triton_part(state, families) if state.settings.triton_metrics_merged else []
    if names:
        wanted = set(names)
        families = [family for family in families if _names_of([family]) & wanted]
        triton = [family for family in triton if family.names() & wanted]
    triton = triton_metrics.without_names(triton, _names_of(families))
    encoder, content_type = choose_encoder(accept or "")
    body = encoder(_Families(families)).decode("utf-8")
    if content_type.startswith(OPENMETRICS):
        body = body[:-len(EOF_LINE)] if body.endswith(EOF_LINE) else body
        body += triton_metrics.render_openmetrics(triton) + EOF_LINE
    else:
        body += triton_metrics.render_text(triton)
    return body, content_type


@bp.get("/metrics")
def metrics():
    """Prometheus text exposition, or OpenMetrics (with exemplars) when the scraper asks for it."""
    body, content_type = exposition(request.headers.get("Accept"), request.args.getlist("name[]") or None)
    return Response(body, 200, {"Content-Type": content_type})
