"""`python -m gateway.serve` (make run) brings up Triton + gunicorn, says where they are, and Ctrl-C stops both."""
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import requests

from gateway_helpers import REPO_ROOT, free_port, pgrep

pytestmark = pytest.mark.triton

START_TIMEOUT_S = 120


class Serving:
    """A running `python -m gateway.serve`: its process, the output up to its ready banner, and the rest on exit."""

    def __init__(self, command: list[str], env: dict | None, until: str = "Ctrl-C stops both"):
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        # A reader thread, so a serve that prints nothing more cannot block a test past its deadline.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.banner = self._until(until, START_TIMEOUT_S)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of output

    def _until(self, marker: str | None, timeout_s: float) -> str:
        output, deadline = [], time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            output.append(line)
            if marker is not None and marker in line:
                break
        return "".join(output)

    def rest(self, timeout_s: float) -> str:
        """Everything printed after the banner, once the process has exited (within `timeout_s`)."""
        self.process.wait(timeout=timeout_s)
        return self._until(None, timeout_s)


@contextmanager
def serving(port: int, *flags: str, env: dict | None = None, until: str = "Ctrl-C stops both"):
    """`python -m gateway.serve` up to the line holding `until` (its ready banner); killed if the test did not stop
    it."""
    command = [sys.executable, "-u", "-m", "gateway.serve", "--port", str(port), "--workers", "1", "--threads", "2",
               *flags]
    served = Serving(command, env, until)
    try:
        yield served
    finally:
        if served.process.poll() is None:
            os.killpg(served.process.pid, signal.SIGKILL)
            served.process.wait()


def test_serve_starts_both_and_ctrl_c_stops_both(model_repository):
    """Also: a GATEWAY_TRITON_METRICS_URL the caller set stands against the started Triton's own URL, and the
    metrics port's process (GATEWAY_METRICS_PORT) comes and goes with the rest."""
    port, metrics_port = free_port(), free_port()
    environment = dict(os.environ, GATEWAY_TRITON_METRICS_URL="off", GATEWAY_METRICS_PORT=str(metrics_port))
    with serving(port, "--triton-grpc-port", "0", "--triton-http-port", "0", "--triton-metrics-port", "0",
                 "--model-repository", str(model_repository), env=environment) as served:
        process, banner = served.process, served.banner
        assert f"web page  http://127.0.0.1:{port}/" in banner, banner
        assert f"metrics   http://127.0.0.1:{port}/metrics" in banner
        triton_grpc = re.search(r"triton    grpc (\S+)", banner).group(1)
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["triton"] == triton_grpc
        assert f"metrics   http://127.0.0.1:{port}/metrics  and port {metrics_port} (own process)" in banner
        for url in (f"http://127.0.0.1:{port}/metrics", f"http://127.0.0.1:{metrics_port}/metrics"):
            merged = requests.get(url, timeout=10).text
            assert "gateway_inflight_requests" in merged and "nv_inference_count" not in merged
            assert "gateway_triton_metrics_up" not in merged

        process.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        rest = served.rest(timeout_s=90)
        assert process.returncode == 0, banner + rest
        assert "gateway stopped (exit code 0)" in rest and "tritonserver stopped (exit code 0)" in rest
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)


def test_serve_uses_the_triton_that_gateway_triton_url_names(gateway_stack):
    """With GATEWAY_TRITON_URL set, `make run` fronts that Triton and starts none of its own."""
    triton, port = gateway_stack.triton, free_port()
    environment = {**os.environ, "GATEWAY_TRITON_URL": triton.grpc_url, "GATEWAY_TRITON_METRICS_URL": triton.metrics_url}
    with serving(port, env=environment) as served:
        process, banner = served.process, served.banner
        assert "starting tritonserver" not in banner, banner
        assert f"triton    grpc {triton.grpc_url}" in banner, banner
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["triton"] == triton.grpc_url
        process.send_signal(signal.SIGINT)
        rest = served.rest(timeout_s=60)
        assert process.returncode == 0 and "tritonserver stopped" not in rest, rest
        assert triton.running  # the Triton it was pointed at is not its to stop


def test_serve_killed_outright_leaves_no_gateway_behind(gateway_stack):
    """SIGKILL gives serve no chance to stop gunicorn (its own session): the kernel's parent-death signal does."""
    triton, port = gateway_stack.triton, free_port()
    environment = {**os.environ, "GATEWAY_TRITON_URL": triton.grpc_url, "GATEWAY_TRITON_METRICS_URL": triton.metrics_url}
    with serving(port, env=environment) as served:
        process, banner = served.process, served.banner
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200, banner
        process.kill()  # serve alone, not its children's sessions
        process.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except requests.ConnectionError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("gunicorn kept serving after serve was killed")
    assert triton.running  # the Triton it was pointed at is not its to stop


def test_every_gateway_setting_reaches_the_workers(monkeypatch):
    """gunicorn's workers rebuild Settings from the environment: what serve (or the benchmark) chose must survive."""
    from dataclasses import fields, replace

    from gateway.serve import gateway_environment
    from gateway.settings import Settings, env_name

    for field in fields(Settings):
        monkeypatch.delenv(env_name(field.name), raising=False)
    chosen = replace(Settings(), port=9999, workers=3, triton_shared_memory="off", max_side=640,
                     triton_timeout_s=2.5, access_log="off", model_version="2")
    environment = gateway_environment(chosen)
    assert environment["GATEWAY_TRITON_SHARED_MEMORY"] == "off"
    assert Settings.from_env(environment) == chosen


OWN_TRITON = ("--triton-grpc-port", "0", "--triton-http-port", "0", "--triton-metrics-port", "0")


def _tritonservers() -> set[int]:
    """Pids of the tritonserver processes on this machine."""
    return set(pgrep("-x", "tritonserver"))


def test_a_taken_gateway_port_is_refused_before_triton_starts(model_repository):
    """Said at once, not after Triton's start-up and five gunicorn retries."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with serving(port, *OWN_TRITON, "--model-repository", str(model_repository), until="no such line") as served:
            output = served.banner + served.rest(timeout_s=30)
    assert served.process.returncode == 1, output
    assert f"error: gateway port {port} on 127.0.0.1 is already in use" in output
    assert "starting tritonserver" not in output


def test_ctrl_c_while_triton_starts_stops_at_once(model_repository):
    """Before the banner a signal cuts the start-up short; Triton's start stops what it began."""
    before = _tritonservers()
    with serving(free_port(), *OWN_TRITON, "--model-repository", str(model_repository),
                 until="starting tritonserver") as served:
        assert "starting tritonserver" in served.banner, served.banner
        deadline = time.monotonic() + 30
        while not _tritonservers() - before:  # the interrupt lands while Triton loads its models
            assert time.monotonic() < deadline, "no tritonserver was started"
            time.sleep(0.1)
        served.process.send_signal(signal.SIGINT)
        rest = served.rest(timeout_s=30)
    assert served.process.returncode == 130, rest
    assert "interrupted while starting" in rest and "Ctrl-C stops both" not in rest
    assert not _tritonservers() - before


def test_a_triton_that_dies_while_serving_is_reported_with_the_end_of_its_log(model_repository):
    """The temporary log goes with Triton's clean-up: the report quotes it first."""
    before = _tritonservers()
    with serving(free_port(), *OWN_TRITON, "--model-repository", str(model_repository)) as served:
        (triton,) = _tritonservers() - before
        os.kill(triton, signal.SIGKILL)
        rest = served.rest(timeout_s=60)
    assert served.process.returncode == 1, rest
    assert "error: tritonserver exited unexpectedly with code -9; last lines:" in rest
    assert "Started GRPCInferenceService" in rest  # a line of Triton's own log
    assert "gateway stopped" in rest
