"""`python -m gateway.serve` (make run) brings up Triton + gunicorn, says where they are, and Ctrl-C stops both."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from gateway_helpers import REPO_ROOT, free_port

pytestmark = pytest.mark.triton

START_TIMEOUT_S = 120


def test_serve_starts_both_and_ctrl_c_stops_both(model_repository):
    port = free_port()
    command = [sys.executable, "-u", "-m", "gateway.serve", "--port", str(port), "--workers", "1", "--threads", "2",
               "--triton-grpc-port", "0", "--triton-http-port", "0", "--triton-metrics-port", "0",
               "--model-repository", str(model_repository)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in process.stdout:
            output.append(line)
            if "Ctrl-C stops both" in line or time.monotonic() > deadline:
                break
        banner = "".join(output)
        assert f"web page  http://127.0.0.1:{port}/" in banner, banner
        assert f"metrics   http://127.0.0.1:{port}/metrics" in banner
        triton_grpc = re.search(r"triton    grpc (\S+)", banner).group(1)
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()["triton"] == triton_grpc

        process.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        rest, _ = process.communicate(timeout=90)
        output.append(rest)
        assert process.returncode == 0, "".join(output)
        assert "gateway stopped (exit code 0)" in rest and "tritonserver stopped (exit code 0)" in rest
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


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
