"""A real tritonserver (the launcher) and a real gunicorn gateway on loopback with free ports, shared by a session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ensemble.triton.launcher import TritonServer
from gateway_helpers import REPO_ROOT, free_port

GUNICORN_CONF = REPO_ROOT / "gateway" / "gunicorn.conf.py"
START_TIMEOUT_S = 60


class _RestartedTritonServer(TritonServer):
    """A TritonServer restarted on its predecessor's ports.

    The launcher's free-port check binds without SO_REUSEADDR, so it refuses a port whose old connections
    are in TIME_WAIT for a minute after Triton stops; tritonserver itself binds with SO_REUSEADDR, so the
    check is skipped here.
    """

    def _claim_ports(self) -> None:
        pass


class GatewayStack:
    """tritonserver + `gunicorn gateway:create_app()` as subprocesses; Triton can be stopped and restarted."""

    def __init__(self, model_repository: Path, log_dir: Path):
        self.model_repository = model_repository
        self.log_dir = log_dir
        self.triton: TritonServer | None = None
        self.gunicorn: subprocess.Popen | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._gunicorn_log = None

    # --- Triton ---
    def start_triton(self, same_ports_as: TritonServer | None = None) -> None:
        kind, ports = (TritonServer, {}) if same_ports_as is None else (_RestartedTritonServer, {
            f"{name}_port": port for name, port in same_ports_as.ports.items()})
        self.triton = kind(self.model_repository, log_file=self.log_dir / "tritonserver.log", **ports)
        self.triton.start()

    def stop_triton(self) -> TritonServer:
        stopped, self.triton = self.triton, None
        stopped.stop()
        return stopped

    # --- gateway ---
    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(self.port), "GATEWAY_WORKERS": "2",
            "GATEWAY_THREADS": "4", "GATEWAY_TRITON_URL": self.triton.grpc_url, "GATEWAY_RETRY_AFTER_S": "3",
            "GATEWAY_TRITON_RECONNECT_BACKOFF_MS": "500", "GATEWAY_LOG_LEVEL": "info",
        })
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        return env

    def start_gateway(self) -> None:
        self._gunicorn_log = open(self.log_dir / "gunicorn.log", "wb")
        self.gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "gateway:create_app()"],
            cwd=REPO_ROOT, env=self.environment(), stdout=self._gunicorn_log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.gunicorn.poll() is None, f"gunicorn exited; see {self.log_dir / 'gunicorn.log'}"
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready within {START_TIMEOUT_S} s; see {self.log_dir / 'gunicorn.log'}")

    def stop_gateway(self) -> int | None:
        if self.gunicorn is None:
            return None
        self.gunicorn.send_signal(signal.SIGTERM)
        try:
            code = self.gunicorn.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.gunicorn.pid, signal.SIGKILL)
            code = self.gunicorn.wait()
        self._gunicorn_log.close()
        self.gunicorn = None
        return code

    def gateway_log(self) -> str:
        return (self.log_dir / "gunicorn.log").read_text(errors="replace")


@pytest.fixture(scope="session")
def gateway_stack(model_repository, artifacts_dir):
    """Triton + gateway for the whole session; a test that stops Triton must start it again."""
    log_dir = artifacts_dir / "gateway"
    log_dir.mkdir(exist_ok=True)
    stack = GatewayStack(model_repository, log_dir)
    stack.start_triton()
    try:
        stack.start_gateway()
        yield stack
    finally:
        stack.stop_gateway()
        if stack.triton is not None:
            stack.stop_triton()


@pytest.fixture(scope="session")
def gateway_url(gateway_stack) -> str:
    return gateway_stack.url


@pytest.fixture(scope="session")
def http():
    """One keep-alive HTTP session, as a real client would use."""
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="session")
def hopper_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def hopper_jpeg(hopper_path) -> bytes:
    return hopper_path.read_bytes()
