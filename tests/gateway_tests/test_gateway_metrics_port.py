"""GATEWAY_METRICS_PORT: the merged /metrics from a process of its own, which answers while every worker thread waits."""
import os
import signal
import socket
import subprocess
import time

import pytest
import requests
from gateway_helpers import Gunicorn, children, free_port
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.triton

THREADS = 2
CLIENT_TIMEOUT_S = 120  # how long a stalled upload holds its thread: longer than anything below waits
# An upload that stops after its first bytes: it holds a worker thread until GATEWAY_CLIENT_TIMEOUT_S.
STALLED = (b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
           b"Content-Length: 100000\r\n\r\n\xff\xd8\xff\xe0")


@pytest.fixture(scope="module")
def gateway(gateway_stack):
    """One worker with two threads, so two stalled uploads occupy it entirely."""
    metrics_port = free_port()
    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "GATEWAY_THREADS": str(THREADS),
                                                  "GATEWAY_METRICS_PORT": str(metrics_port),
                                                  "GATEWAY_CLIENT_TIMEOUT_S": str(CLIENT_TIMEOUT_S)})
    started = Gunicorn(env, gateway_stack.log_dir / "metrics_port.log").start()
    started.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield started
    started.stop()


def _samples(text: str) -> dict:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_metrics_port_serves_the_merged_page_of_the_api_port(gateway, hopper_jpeg):
    answer = requests.post(gateway.url + "/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"},
                           timeout=60)
    assert answer.status_code == 200
    # the answer's metrics are written just after it went out
    deadline = time.monotonic() + 10
    while (own := _samples(page := requests.get(gateway.metrics_url, timeout=10).text)).get(
            ("gateway_faces_per_image_count", ())) != 1.0:
        assert time.monotonic() < deadline, "the detection never showed on the metrics port"
        time.sleep(0.1)
    api = _samples(requests.get(gateway.url + "/metrics", timeout=10).text)
    counted = ("flask_http_request_total", (("method", "POST"), ("status", "200")))
    assert own[counted] == api[counted] == 1.0  # the worker's files, read by another process
    assert own[("gateway_triton_metrics_up", ())] == 1.0
    assert '\nnv_inference_count{model="mask_detection"' in page  # Triton's page, fetched by this process
    openmetrics = requests.get(gateway.metrics_url, headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    only = requests.get(gateway.metrics_url, params={"name[]": "gateway_inflight_requests"}, timeout=10).text
    assert {name for name, _ in _samples(only)} == {"gateway_inflight_requests"}
    assert requests.get(gateway.metrics_url.replace("/metrics", "/v1/detect"), timeout=10).status_code == 404


def test_the_metrics_port_answers_while_every_worker_thread_is_busy(gateway):
    """What the port is for: with each thread held (here by stalled uploads; in production by a hung Triton), a
    scrape of the API port waits in the queue, and the metrics port still shows what is going on."""
    stalled = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(THREADS)]
    try:
        for connection in stalled:
            connection.sendall(STALLED)
        deadline = time.monotonic() + 20
        while _samples(requests.get(gateway.metrics_url, timeout=10).text)[
                ("gateway_inflight_requests", ())] != THREADS:
            assert time.monotonic() < deadline, "the stalled uploads never showed as in flight"
            time.sleep(0.1)
        with pytest.raises(requests.Timeout):  # queued behind the stalled uploads for CLIENT_TIMEOUT_S
            requests.get(gateway.url + "/metrics", timeout=3)
    finally:
        for connection in stalled:
            connection.close()


def _metrics_processes(master: int) -> list[int]:
    return [pid for pid in children(master) if "gateway.metrics_server" in open(f"/proc/{pid}/cmdline").read()]


def test_a_metrics_process_that_dies_is_replaced(gateway):
    (first,) = _metrics_processes(gateway.process.pid)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        replaced = [pid for pid in _metrics_processes(gateway.process.pid) if pid != first]
        try:
            if replaced and requests.get(gateway.metrics_url, timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "no new metrics process served the port"
        time.sleep(0.2)
    assert "gateway.metrics_server (pid %d) exited" % first in gateway.log_text()


def test_the_metrics_process_survives_a_hup_and_stops_with_gunicorn_and_a_taken_port_stops_gunicorn(
        gateway_stack):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1",
                                                      "GATEWAY_METRICS_PORT": str(taken.getsockname()[1])})
        refused = Gunicorn(env, gateway_stack.log_dir / "metrics_port_taken.log")
        with pytest.raises(AssertionError, match="gunicorn exited"):
            refused.start()
        assert refused.process.wait(timeout=30) != 0
        assert "did not serve port" in refused.log_text()
    finally:
        taken.close()

    metrics_port = free_port()
    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "GATEWAY_METRICS_PORT": str(metrics_port)})
    started = Gunicorn(env, gateway_stack.log_dir / "metrics_port_stop.log").start()
    helpers = _metrics_processes(started.process.pid)
    assert len(helpers) == 1
    # a HUP reloads the configuration and replaces the workers; the metrics process stays, and is still the one
    # the reloaded configuration stops
    workers = set(children(started.process.pid)) - set(helpers)
    started.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while set(children(started.process.pid)) & workers:
        assert time.monotonic() < deadline, "the workers were not replaced after HUP"
        time.sleep(0.2)
    assert _metrics_processes(started.process.pid) == helpers
    assert requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).status_code == 200
    environ = dict(item.split("=", 1) for item in open(f"/proc/{helpers[0]}/environ").read().split("\0") if item)
    made_here = environ["PROMETHEUS_MULTIPROC_DIR"]  # by gunicorn.conf.py: the test passed none
    assert started.stop() == 0
    assert not os.path.exists(made_here)  # removed at exit, though the HUP re-read the config
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", metrics_port), timeout=5).close()
    assert subprocess.run(["kill", "-0", str(helpers[0])], capture_output=True).returncode != 0
