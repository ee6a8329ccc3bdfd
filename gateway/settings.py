"""The gateway's one typed configuration object; the only module that reads the environment."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Mapping

from gateway.log_format import FORMATS as LOG_FORMATS

ENV_PREFIX = "GATEWAY_"
OFF = "off"  # turns an optional output off (an empty variable means "the default", like an unset one)
SHARED_MEMORY_SYSTEM = "system"  # images reach Triton through system shared memory where it can map it
SHARED_MEMORY_CHOICES = (SHARED_MEMORY_SYSTEM, OFF)
TRITON_METRICS_PORT = 8002  # tritonserver's default --metrics-port


def triton_metrics_url_for(triton_url: str) -> str:
    """Where a Triton serving gRPC at `triton_url` (host:port) publishes its metrics by default."""
    host = triton_url.rpartition(":")[0] or triton_url
    return f"http://{host}:{TRITON_METRICS_PORT}/metrics"


@dataclass(frozen=True)
class Settings:
    """Every knob of the gateway, with the default it runs with when the environment says nothing.

    Each field `name` is read from the environment variable `GATEWAY_<NAME>` (upper case),
    except the OpenTelemetry fields and `prometheus_multiproc_dir`, which keep the standard names their
    own ecosystems (OTEL_*, PROMETHEUS_MULTIPROC_DIR) already use; see `_FOREIGN_NAMES`.
    """

    # --- HTTP server (gunicorn) ---
    host: str = "127.0.0.1"  # interface gunicorn binds to
    port: int = 8080  # gateway HTTP port
    workers: int = 2  # gunicorn worker processes, each with its own Triton client
    threads: int = 4  # threads per worker (gthread): requests mostly wait on Triton
    worker_timeout_s: int = 60  # gunicorn kills a worker silent this long
    graceful_timeout_s: int = 20  # in-flight requests get this long after SIGTERM
    keepalive_s: int = 5  # idle keep-alive connections are closed after this
    client_timeout_s: float = 30.0  # a client that sends nothing for this long mid-request is cut off (408); 0: never

    # --- Triton ---
    triton_url: str = "127.0.0.1:8001"  # gRPC host:port of tritonserver
    triton_timeout_s: float = 10.0  # deadline of one inference call (client_timeout)
    triton_ready_timeout_s: float = 2.0  # deadline of the readiness probe behind /readyz
    triton_reconnect_backoff_ms: int = 1000  # cap on gRPC reconnect backoff, so recovery is quick
    model_name: str = "mask_detection"  # the ensemble the gateway calls
    model_version: str = ""  # "" lets Triton pick its latest ready version
    retry_after_s: int = 5  # Retry-After sent with 503 / 429
    triton_shared_memory: str = SHARED_MEMORY_SYSTEM  # "system": pixels via /dev/shm when Triton shares the
    #                           host (else inline, found out at the first request); "off": always inside the request

    # --- input limits ---
    max_body_bytes: int = 10 * 1024 * 1024  # one image upload (413 above)
    max_batch_bytes: int = 50 * 1024 * 1024  # a whole /v1/detect/batch request (413 above)
    max_batch_images: int = 16  # images in one batch request (422 above)
    max_pixels: int = 40_000_000  # width x height read from the header before decoding (413 above)
    max_side: int = 1280  # longer side is downscaled to this before inference; boxes are mapped back
    batch_concurrency: int = 4  # images of one batch request in flight to Triton at once

    # --- observability: traces (the standard OTEL_* names; the SDK reads its other OTEL_* knobs itself) ---
    service_name: str = "facemask-gateway"  # OTEL_SERVICE_NAME: the resource's service.name
    otlp_endpoint: str = ""  # OTEL_EXPORTER_OTLP_ENDPOINT (base URL; /v1/traces is appended for HTTP)
    otlp_traces_endpoint: str = ""  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (full URL, used as is; wins)
    otlp_protocol: str = "http/protobuf"  # OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf" or "grpc"
    traces_sampler: str = ""  # OTEL_TRACES_SAMPLER; "" = parentbased_always_on with an exporter, else
    #                           parentbased_always_off (no exporter: only a caller's sampled trace is continued)
    traces_sampler_arg: str = ""  # OTEL_TRACES_SAMPLER_ARG, e.g. the ratio of traceidratio samplers

    # --- observability: metrics and logs ---
    prometheus_multiproc_dir: str = ""  # PROMETHEUS_MULTIPROC_DIR; set by gunicorn.conf.py when empty
    triton_metrics_url: str = triton_metrics_url_for(triton_url)  # merged into /metrics; "off" turns the merge
    #                           off; unset, it follows GATEWAY_TRITON_URL's host (port 8002)
    triton_metrics_timeout_s: float = 1.0  # a slow Triton costs a scrape at most this much
    metrics_port: int = 0  # a second port serving only /metrics, from a process of its own (0: none)
    access_log: str = "-"  # one JSON line per request: "-" stdout, a path appends to that file, "off" none
    log_level: str = "info"  # gunicorn and gateway log level
    log_format: str = "text"  # gunicorn's and the gateway's lines on stderr: "text", or "json" (one object a line)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from the environment (or `environ`), then apply explicit overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(env_name(field.name))
            if raw is not None and raw != "":
                values[field.name] = _coerce(field.name, field.type, raw)
        if "triton_url" in values and "triton_metrics_url" not in values:
            values["triton_metrics_url"] = triton_metrics_url_for(values["triton_url"])
        return replace(cls(**values), **overrides)

    @classmethod
    def set_in(cls, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """The fields the environment (or `environ`) sets, so a launcher can tell a chosen value from a default."""
        environ = os.environ if environ is None else environ
        return frozenset(field.name for field in fields(cls) if environ.get(env_name(field.name)))

    def __post_init__(self):
        if self.triton_shared_memory not in SHARED_MEMORY_CHOICES:
            raise ValueError(f"{env_name('triton_shared_memory')}={self.triton_shared_memory!r} is not one of "
                             f"{', '.join(SHARED_MEMORY_CHOICES)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"{env_name('log_format')}={self.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
        if not 0 <= self.client_timeout_s < 2**31:
            raise ValueError(f"{env_name('client_timeout_s')}={self.client_timeout_s!r} is not a number of seconds "
                             f"(0 turns the timeout off)")

    @property
    def triton_metrics_merged(self) -> bool:
        return self.triton_metrics_url not in ("", OFF)

    @property
    def traces_exported(self) -> bool:
        """Whether an OTLP endpoint is configured, i.e. whether spans leave the process at all."""
        return bool(self.otlp_traces_endpoint or self.otlp_endpoint)


_FOREIGN_NAMES = {
    "service_name": "OTEL_SERVICE_NAME",
    "otlp_endpoint": "OTEL_EXPORTER_OTLP_ENDPOINT",
    "otlp_traces_endpoint": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "otlp_protocol": "OTEL_EXPORTER_OTLP_PROTOCOL",
    "traces_sampler": "OTEL_TRACES_SAMPLER",
    "traces_sampler_arg": "OTEL_TRACES_SAMPLER_ARG",
    "prometheus_multiproc_dir": "PROMETHEUS_MULTIPROC_DIR",
}


def env_name(field_name: str) -> str:
    """The environment variable a field is read from (a launcher uses it to hand settings to children)."""
    return _FOREIGN_NAMES.get(field_name, ENV_PREFIX + field_name.upper())


def _coerce(name: str, type_name: str, raw: str):
    """Turn an environment string into the field's type, naming the variable when it cannot."""
    kind = {"int": int, "float": float, "str": str}[str(type_name)]
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{env_name(name)}={raw!r} is not a valid {kind.__name__}") from None

