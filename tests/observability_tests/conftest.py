"""One observed stack for the session: an OTLP receiver, tritonserver tracing to it (rate=0), and a gunicorn
gateway (2 workers, multiprocess metrics in a known folder and on a metrics port of their own, JSON access log to
a file, spans to the receiver).

The servers are started by the gateway tests' helpers (tests/gateway_tests/gateway_helpers.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway_tests"))

from gateway_helpers import GatewayStack  # noqa: E402
from observed import BSP_DELAY_MS, GATEWAY_SERVICE  # noqa: E402
from otlp_receiver import OtlpReceiver  # noqa: E402

from ensemble.triton.launcher import TraceSettings  # noqa: E402


@pytest.fixture(scope="session")
def otlp_receiver():
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def observed_dir(artifacts_dir) -> Path:
    directory = artifacts_dir / "observability"
    directory.mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def observed_stack(model_repository, observed_dir, otlp_receiver):
    """Triton traced with rate=0 into the receiver; a 2-worker gateway exporting OTLP http/protobuf there."""
    multiproc_dir = observed_dir / "prometheus-multiproc"
    multiproc_dir.mkdir(exist_ok=True)
    access_log = observed_dir / "access.log"
    access_log.write_text("")
    stack = GatewayStack(
        model_repository, observed_dir, workers=2, metrics_port=True,  # Prometheus scrapes it, as in compose/
        triton_trace=TraceSettings(otlp_receiver.triton_url, rate=0, bsp_schedule_delay_ms=BSP_DELAY_MS),
        gateway_env={
            "OTEL_SERVICE_NAME": GATEWAY_SERVICE,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.base_url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "1.0",
            "OTEL_BSP_SCHEDULE_DELAY": str(BSP_DELAY_MS),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
            "GATEWAY_ACCESS_LOG": str(access_log),
        })
    stack.access_log = access_log
    stack.multiproc_dir = multiproc_dir
    with stack.running():
        yield stack


@pytest.fixture(scope="session")
def hopper_jpeg() -> bytes:
    import matplotlib

    return (Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()


@pytest.fixture(scope="session")
def http():
    with requests.Session() as session:
        yield session
