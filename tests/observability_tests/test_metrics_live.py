"""The merged /metrics of real gunicorn gateways: several workers counted once, and the gateway's own metrics
still served when Triton's metrics port does not answer."""
from __future__ import annotations

import json
import socket
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from gateway_helpers import sample_sum, scraped
from prometheus_client.mmap_dict import MmapedDict

pytestmark = pytest.mark.triton

ROUND = 8  # requests sent at once, each on its own connection
MAX_REQUESTS = 304  # sent at most while waiting for the second worker to serve some
TRITON_METRICS_TIMEOUT_S = 0.5


def _requests_total(url: str) -> float:
    return sample_sum(scraped(url + "/metrics"), "flask_http_request_total")  # 0 before the first request


def _per_worker_requests(directory) -> dict[str, float]:
    """flask_http_request_total as each worker process wrote it into its multiprocess file."""
    totals: dict[str, float] = defaultdict(float)
    for path in directory.glob("counter_*.db"):
        pid = path.stem.split("_")[-1]
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "flask_http_request_total":
                totals[pid] += value
    return dict(totals)


def test_requests_served_by_several_workers_are_each_counted_once(observed_stack, hopper_jpeg):
    before_total = _requests_total(observed_stack.url)
    before_workers = _per_worker_requests(observed_stack.multiproc_dir)

    def one(_):
        with requests.Session() as session:  # a new connection each time: the workers compete for them
            return session.post(observed_stack.url + "/v1/detect", data=hopper_jpeg,
                                headers={"Content-Type": "image/jpeg"}, timeout=60).status_code

    def served() -> dict[str, float]:
        after_workers = _per_worker_requests(observed_stack.multiproc_dir)
        return {pid: after_workers[pid] - before_workers.get(pid, 0) for pid in after_workers}

    # Which worker accepts a connection is the kernel's choice: send until both have served some, within a bound.
    count = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        while count < MAX_REQUESTS and sum(1 for n in served().values() if n > 0) < 2:
            assert set(pool.map(one, range(ROUND))) == {200}
            count += ROUND
    per_worker = served()
    assert sum(1 for n in per_worker.values() if n > 0) >= 2, f"one worker took all {count} requests: {per_worker}"
    assert sum(per_worker.values()) == count
    assert _requests_total(observed_stack.url) - before_total == count  # the merged view agrees
    inflight = requests.get(observed_stack.url + "/metrics", timeout=30).text
    assert "gateway_inflight_requests 0.0" in inflight  # livesum over the workers, all done


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers: a hung Triton."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


def test_gateway_metrics_come_back_when_triton_metrics_hang(observed_stack, silent_port, hopper_jpeg):
    gateway = observed_stack.start_another_gateway("gunicorn-triton-metrics-down", {
        "GATEWAY_WORKERS": "1", "GATEWAY_TRITON_METRICS_URL": f"http://127.0.0.1:{silent_port}/metrics",
        "GATEWAY_TRITON_METRICS_TIMEOUT_S": str(TRITON_METRICS_TIMEOUT_S), "GATEWAY_ACCESS_LOG": "off",
        "PROMETHEUS_MULTIPROC_DIR": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""})
    try:
        detected = requests.post(gateway.url + "/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"},
                                 timeout=60)
        assert detected.status_code == 200  # inference does not need Triton's metrics port
        deadline = time.monotonic() + 10
        while True:
            # The silent port never answers: a scrape that waited for it (no timeout on the fetch) would never
            # come back, and this read's timeout, far above the gateway's own, would fail the test.
            response = requests.get(gateway.url + "/metrics", timeout=TRITON_METRICS_TIMEOUT_S + 10)
            assert response.status_code == 200
            text = response.text
            # the request's per-image metrics are written just after its answer (gateway/after_response.py): a
            # scrape that the answer's client sends at once can be served first, by another thread
            if "gateway_stage_duration_seconds" in text or time.monotonic() > deadline:
                break
        assert "gateway_triton_metrics_up 0.0" in text
        assert "flask_http_request_duration_seconds" in text and "gateway_stage_duration_seconds" in text
        assert "nv_" not in text
        assert "Triton metrics at" in gateway.log_text()  # said once, why
    finally:
        gateway.stop()
