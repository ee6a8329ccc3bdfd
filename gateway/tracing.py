"""OpenTelemetry for the gateway: a per-process TracerProvider, Flask spans, and context for Triton."""
from __future__ import annotations

import os

from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.settings import Settings

# Probes and scrapes would drown the traces that matter.
UNTRACED_URLS = "healthz,readyz,metrics"

_W3C = TraceContextTextMapPropagator()
_provider: tuple[int, TracerProvider] | None = None  # (pid that built it, provider)


def setup_tracing(settings: Settings) -> TracerProvider:
    """This process's TracerProvider, built on first use (after fork: a forked provider's exporter thread is dead).

    Spans are always created, so a sampled caller's trace continues into Triton; they are only
    exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Sampling follows the SDK's OTEL_TRACES_SAMPLER
    (parent-based, always-on by default), so a caller's `traceparent` decides for its request.
    """
    global _provider
    if _provider is not None and _provider[0] == os.getpid():
        return _provider[1]
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}))
    if settings.otlp_endpoint:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    if _provider is None:
        trace.set_tracer_provider(provider)  # the global can be set once per process image
    _provider = (os.getpid(), provider)
    return provider


def _otlp_exporter(settings: Settings):
    """OTLP over HTTP (what Triton's own exporter speaks) unless OTEL_EXPORTER_OTLP_PROTOCOL says grpc."""
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.otlp_endpoint.rstrip("/") + "/v1/traces")


def register_tracing(app: Flask, settings: Settings) -> None:
    """Server spans for every request, continuing the caller's W3C `traceparent` when it sends one."""
    FlaskInstrumentor().instrument_app(app, tracer_provider=setup_tracing(settings), excluded_urls=UNTRACED_URLS)


def triton_trace_headers() -> dict[str, str] | None:
    """gRPC metadata carrying the current span's `traceparent`, only when that span is sampled.

    Triton traces every request that carries trace context, so a sampled-out request must send none.
    """
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier or None
