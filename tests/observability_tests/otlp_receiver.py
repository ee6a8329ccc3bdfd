"""A tiny OTLP/HTTP trace receiver on loopback for tests: POST /v1/traces in protobuf (the Python SDK's
http/protobuf exporter) or JSON (Triton's OpenTelemetry exporter), decoded into flat `ReceivedSpan`s.

    with OtlpReceiver() as receiver:
        ...  # point OTEL_EXPORTER_OTLP_ENDPOINT at receiver.base_url, Triton at receiver.triton_url
        spans = receiver.wait_for(lambda spans: ..., timeout=10)
"""
from __future__ import annotations

import base64
import binascii
import gzip
import json
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                     ExportTraceServiceResponse)

TRACES_PATH = "/v1/traces"
SPAN_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, INTERNAL, ...
    attributes: dict[str, Any]
    event_attributes: list[dict[str, Any]] = field(default_factory=list)
    encoding: str = ""  # "protobuf" or "json": how it reached the receiver


# --- protobuf ----------------------------------------------------------------------------------------------
def _any_value(value) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: _any_value(item.value) for item in value.kvlist_value.values}
    if kind == "bytes_value":
        return bytes(value.bytes_value)
    return getattr(value, kind)


def _attributes(key_values) -> dict[str, Any]:
    return {item.key: _any_value(item.value) for item in key_values}


def spans_from_protobuf(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    service=service, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None, name=span.name,
                    kind=SPAN_KINDS.get(span.kind, str(span.kind)), attributes=_attributes(span.attributes),
                    event_attributes=[_attributes(event.attributes) for event in span.events], encoding="protobuf"))
    return spans


# --- JSON (OTLP/JSON: ids in hex; some exporters send base64) ----------------------------------------------
def _json_id(value: str | None, size: int) -> str | None:
    if not value:
        return None
    if len(value) == 2 * size:
        int(value, 16)
        return value.lower()
    try:
        return base64.b64decode(value, validate=True).hex()
    except (binascii.Error, ValueError):
        raise ValueError(f"span id {value!r} is neither hex nor base64") from None


def _json_value(value: dict) -> Any:
    if not value:
        return None
    (kind, inner), = value.items()
    if kind == "intValue":
        return int(inner)
    if kind == "doubleValue":
        return float(inner)
    if kind == "arrayValue":
        return [_json_value(item) for item in inner.get("values", [])]
    if kind == "kvlistValue":
        return {item["key"]: _json_value(item.get("value", {})) for item in inner.get("values", [])}
    return inner


def _json_attributes(items) -> dict[str, Any]:
    return {item["key"]: _json_value(item.get("value", {})) for item in items or []}


def _json_kind(kind) -> str:
    if isinstance(kind, int):
        return SPAN_KINDS.get(kind, str(kind))
    return str(kind or "SPAN_KIND_UNSPECIFIED").removeprefix("SPAN_KIND_")


def spans_from_json(body: bytes) -> list[ReceivedSpan]:
    document = json.loads(body)
    spans = []
    for resource_spans in document.get("resourceSpans", []):
        service = str(_json_attributes(resource_spans.get("resource", {}).get("attributes")).get("service.name", ""))
        scopes = resource_spans.get("scopeSpans") or resource_spans.get("instrumentationLibrarySpans") or []
        for scope_spans in scopes:
            for span in scope_spans.get("spans", []):
                spans.append(ReceivedSpan(
                    service=service, trace_id=_json_id(span.get("traceId"), 16),
                    span_id=_json_id(span.get("spanId"), 8),
                    parent_span_id=_json_id(span.get("parentSpanId"), 8), name=span.get("name", ""),
                    kind=_json_kind(span.get("kind")), attributes=_json_attributes(span.get("attributes")),
                    event_attributes=[_json_attributes(event.get("attributes")) for event in span.get("events", [])],
                    encoding="json"))
    return spans


# --- the server --------------------------------------------------------------------------------------------
class OtlpReceiver:
    """ThreadingHTTPServer on 127.0.0.1 (a free port) collecting every span posted to /v1/traces."""

    def __init__(self):
        self.spans: list[ReceivedSpan] = []
        self.requests: list[tuple[str, str]] = []  # (content type, "ok" or the decoding error)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as real collectors do: Triton's exporter (opentelemetry-cpp over curl) reuses its
            # connection, and an export sent on a connection the server already closed is lost, not retried.
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if self.path.split("?")[0] != TRACES_PATH:
                    self.send_error(404)
                    return
                try:
                    if content_type == "application/x-protobuf":
                        spans, reply = spans_from_protobuf(body), ExportTraceServiceResponse().SerializeToString()
                    elif content_type == "application/json":
                        spans, reply = spans_from_json(body), b"{}"
                    else:
                        raise ValueError(f"unsupported Content-Type {content_type!r}")
                except Exception as error:  # a malformed export is recorded and answered 400
                    receiver._record(content_type, f"{type(error).__name__}: {error}", [])
                    self.send_error(400, str(error)[:200])
                    return
                receiver._record(content_type, "ok", spans)
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (the SDK appends /v1/traces)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_url(self) -> str:
        """For OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is)."""
        return self.base_url + TRACES_PATH

    @property
    def triton_url(self) -> str:
        """Triton's `--trace-config opentelemetry,url=` form: host:port/path, no scheme."""
        return f"127.0.0.1:{self.port}{TRACES_PATH}"

    def _record(self, content_type: str, outcome: str, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self.requests.append((content_type, outcome))
            self.spans.extend(spans)
            self._changed.notify_all()

    def __enter__(self) -> "OtlpReceiver":
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def mark(self) -> int:
        """The number of spans received so far: pass it to `since` to see only what came later."""
        with self._lock:
            return len(self.spans)

    def since(self, mark: int) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans[mark:])

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], timeout: float = 15.0,
                 since: int = 0) -> list[ReceivedSpan]:
        """Block until `condition(spans received after `since`)` holds; AssertionError with what arrived if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                spans = list(self.spans[since:])
                if condition(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = sorted({(span.service, span.name) for span in spans})
                    raise AssertionError(f"condition not met within {timeout} s; received {len(spans)} spans: "
                                         f"{summary}; export requests: {self.requests[-5:]}")
                self._changed.wait(min(remaining, 0.5))

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [span for span in self.snapshot() if span.trace_id == trace_id]
