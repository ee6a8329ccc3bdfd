"""OpenTelemetry for the gateway: a per-process TracerProvider, Flask server spans, the gateway's own stage spans,
the CLIENT span of the Triton call, and the trace context handed to Triton.

Span attributes carry sizes, counts and names only, never image bytes or anything derived from pixels, and
nothing about the caller: the instrumentation's client address, user agent and query string are withheld.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from typing import Iterator

from flask import Flask, current_app, g, has_app_context, has_request_context, request
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.operational import operational_url_patterns
from gateway.settings import Settings, env_name

# What the Flask instrumentation records about the caller (old and new HTTP semantic conventions): personal
# data, overwritten with WITHHELD on every server span.
CLIENT_ATTRIBUTES = ("net.peer.ip", "net.peer.port", "net.peer.name", "http.user_agent", "http.client_ip",
                     "client.address", "client.port", "user_agent.original", "url.query")
WITHHELD = "withheld"
TRACER_NAME = "gateway"
# Triton's gRPC API (grpc_service.proto): what the CLIENT span's rpc.* attributes name.
TRITON_RPC_SERVICE = "inference.GRPCInferenceService"
TRITON_RPC_METHOD = "ModelInfer"
# grpc.StatusCode names -> their numeric codes, for the rpc.grpc.status_code attribute.
GRPC_STATUS_CODES = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
                     "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
                     "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
                     "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}

PROVIDER_KEY = "tracer_provider"  # in app.extensions
# The API's error code (and whose fault it is) on a span whose work ended in an error answer: the server span of
# the request, and the CLIENT span of each failed Triton call (a batch's images fail each in their own way).
ERROR_CODE_ATTRIBUTE, ERROR_KIND_ATTRIBUTE = "gateway.error.code", "gateway.error.kind"

_W3C = TraceContextTextMapPropagator()
_global_set_in: int | None = None  # the pid whose global TracerProvider is set (once per process image)
_providers: dict[tuple, TracerProvider] = {}  # (pid, tracing settings) -> provider


def build_sampler(settings: Settings) -> sampling.Sampler:
    """The sampler OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG name (the SDK's names and meaning).

    Unset: parent-based always-on when spans are exported; parent-based always-off when they are not, so a
    gateway without an exporter records nothing of its own yet still continues a caller's sampled trace into
    Triton. An unknown name is an error, not a silent fallback.
    """
    name = settings.traces_sampler.strip().lower()
    if not name:
        return sampling.DEFAULT_ON if settings.traces_exported else sampling.DEFAULT_OFF
    fixed = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF,
             "parentbased_always_on": sampling.DEFAULT_ON, "parentbased_always_off": sampling.DEFAULT_OFF}
    if name in fixed:
        return fixed[name]
    ratio_samplers = {"traceidratio": sampling.TraceIdRatioBased,
                      "parentbased_traceidratio": sampling.ParentBasedTraceIdRatio}
    if name not in ratio_samplers:
        raise ValueError(f"{env_name('traces_sampler')}={settings.traces_sampler!r} is not one of "
                         f"{', '.join([*fixed, *ratio_samplers])}")
    try:
        ratio = float(settings.traces_sampler_arg) if settings.traces_sampler_arg else 1.0
    except ValueError:
        raise ValueError(f"{env_name('traces_sampler_arg')}={settings.traces_sampler_arg!r} is not a ratio") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{env_name('traces_sampler_arg')}={ratio} is outside 0..1")
    return ratio_samplers[name](ratio)


def setup_tracing(settings: Settings) -> TracerProvider:
    """This process's TracerProvider, built on first use (after fork: a forked provider's exporter thread is dead).

    Spans leave the process only when an OTLP endpoint is configured; the batch processor's own knobs
    (OTEL_BSP_SCHEDULE_DELAY, ...) and the exporter's (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION)
    are read by the SDK itself.
    """
    global _global_set_in
    key = (os.getpid(), settings.service_name, settings.traces_sampler, settings.traces_sampler_arg,
           settings.otlp_endpoint, settings.otlp_traces_endpoint, settings.otlp_protocol)
    provider = _providers.get(key)
    if provider is not None:
        return provider
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: settings.service_name}),
                              sampler=build_sampler(settings))
    if settings.traces_exported:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    if _global_set_in is None:
        trace.set_tracer_provider(provider)  # the global can be set once per process image
        _global_set_in = os.getpid()
    _providers[key] = provider
    return provider


def otlp_traces_url(settings: Settings) -> str:
    """Where spans go, by the OTLP rules: the signal-specific endpoint as is, else the base endpoint + /v1/traces
    (HTTP) or as is (gRPC)."""
    if settings.otlp_traces_endpoint:
        return settings.otlp_traces_endpoint
    if settings.otlp_protocol == "grpc":
        return settings.otlp_endpoint
    return settings.otlp_endpoint.rstrip("/") + "/v1/traces"


def _otlp_exporter(settings: Settings):
    """OTLP over HTTP/protobuf (what Jaeger and Triton's collector speak), or gRPC when the protocol says so."""
    if settings.otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif settings.otlp_protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"{env_name('otlp_protocol')}={settings.otlp_protocol!r}: use http/protobuf or grpc")
    return OTLPSpanExporter(endpoint=otlp_traces_url(settings))


def register_tracing(app: Flask, settings: Settings) -> None:
    """Server spans for every request, continuing the caller's W3C `traceparent` when it sends one."""
    provider = setup_tracing(settings)
    app.extensions[PROVIDER_KEY] = provider
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider, response_hook=withhold_client_details,
                                       excluded_urls=",".join(operational_url_patterns()))

    @app.after_request
    def _name_the_error(response):
        """An error answer's code on the server span: which 503 it was, and that a 4xx (status left unset) was one."""
        if g.get("error_code"):
            set_server_span_attributes(**{ERROR_CODE_ATTRIBUTE: g.error_code, ERROR_KIND_ATTRIBUTE: g.error_kind})
        return response


def withhold_client_details(span: trace.Span, status: str, response_headers) -> None:
    """Keep the caller's address, user agent and query values (thresholds, anything else) out of the server span.

    The instrumentation records them when the request starts and again after its request hook, and a span
    cannot drop an attribute, so they are overwritten here, as the answer starts; `http.target` keeps the path.
    """
    if not span.is_recording():
        return
    recorded = getattr(span, "attributes", None) or {}
    withheld = {key: WITHHELD for key in CLIENT_ATTRIBUTES if key in recorded}
    if "http.target" in recorded:
        withheld["http.target"] = request.path if has_request_context() else WITHHELD
    span.set_attributes(withheld)


def _tracer() -> trace.Tracer:
    """The running app's tracer (its settings' sampler and exporter), the global one outside an app."""
    provider = current_app.extensions.get(PROVIDER_KEY) if has_app_context() else None
    return _tracer_of(provider or trace.get_tracer_provider())


@functools.lru_cache(maxsize=16)
def _tracer_of(provider: trace.TracerProvider) -> trace.Tracer:
    """One tracer per provider: the SDK's get_tracer rewrites the process's warning filters on every call."""
    return provider.get_tracer(TRACER_NAME)


def _inside_unsampled_span() -> bool:
    """Whether the current span exists but is not sampled, so no child of it can be.

    Every sampler the gateway builds decides a child as it decided its parent (by the parent's flag or by the
    same trace id), so a child span here would only cost time (about 0.1 ms a request in all).
    """
    context = trace.get_current_span().get_span_context()
    return context.is_valid and not context.trace_flags.sampled


@contextmanager
def stage_span(name: str, **attributes) -> Iterator[trace.Span]:
    """An INTERNAL span around one stage of the request (decode, encode); exceptions are recorded by the SDK."""
    if _inside_unsampled_span():
        yield trace.INVALID_SPAN
        return
    with _tracer().start_as_current_span(name, kind=SpanKind.INTERNAL, attributes=attributes) as span:
        yield span


@contextmanager
def triton_call_span(settings: Settings) -> Iterator[trace.Span]:
    """The CLIENT span of one ModelInfer call, with the RPC semantic-convention attributes.

    It is the current span while the call is made, so the `traceparent` Triton receives names it as the parent
    of Triton's own `InferRequest` span. The caller reports the outcome with `set_rpc_status`.
    """
    if _inside_unsampled_span():
        yield trace.INVALID_SPAN  # and the unsampled parent stays current: Triton gets no traceparent either way
        return
    host, _, port = settings.triton_url.rpartition(":")
    attributes = {"rpc.system": "grpc", "rpc.service": TRITON_RPC_SERVICE, "rpc.method": TRITON_RPC_METHOD,
                  "server.address": host or settings.triton_url, "triton.model.name": settings.model_name}
    if port.isdigit():
        attributes["server.port"] = int(port)
    if settings.model_version:
        attributes["triton.model.version"] = settings.model_version
    name = f"{TRITON_RPC_SERVICE}/{TRITON_RPC_METHOD}"
    with _tracer().start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes,
                                         record_exception=False, set_status_on_exception=False) as span:
        yield span


def set_rpc_status(span: trace.Span, status_name: str, error: BaseException | None = None) -> None:
    """Record the gRPC status ("OK", "UNAVAILABLE", ...; "" before any status: then `error`'s class names it)."""
    code = GRPC_STATUS_CODES.get(status_name)
    if code is not None:
        span.set_attribute("rpc.grpc.status_code", code)
    if status_name != "OK":
        error_type = status_name or (type(error).__qualname__ if error is not None else "_OTHER")
        span.set_attribute("error.type", error_type)
        span.set_status(Status(StatusCode.ERROR, error_type))


def _sampled_context() -> trace.SpanContext | None:
    """The current span's context when it is sampled (exported), else None."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid and context.trace_flags.sampled else None


def current_trace_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) in hex of the current span when it is sampled (exported), else (None, None).

    Logs and exemplars name only traces that a trace backend can actually show.
    """
    context = _sampled_context()
    if context is None:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def set_server_span_attributes(**attributes) -> None:
    """Add attributes (counts, sizes, ids) to the current request's span when it is recording."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({key: value for key, value in attributes.items() if value is not None})


def triton_trace_headers() -> dict[str, str] | None:
    """gRPC metadata carrying the current span's `traceparent`, only when that span is sampled.

    Triton traces every request that carries trace context, so a sampled-out request must send none.
    """
    if _sampled_context() is None:
        return None
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    return carrier or None
