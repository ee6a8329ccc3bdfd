"""Triton going away and coming back on the same ports: 503 + Retry-After meanwhile, recovery without a restart."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from gateway_helpers import GatewayStack, Gunicorn, free_port, sample_sum, scraped

from benchmarks.config_variant import make_variant

pytestmark = pytest.mark.triton

RECOVERY_TIMEOUT_S = 30


# Module-level requests calls open a new connection each time, so both gunicorn workers get some of them.
def detect(url, data):
    return requests.post(url + "/v1/detect", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60)


def ready(url):
    return requests.get(url + "/readyz", timeout=10)


def test_gateway_reports_outage_and_recovers(gateway_stack, hopper_jpeg):
    url = gateway_stack.url
    assert detect(url, hopper_jpeg).status_code == 200
    gunicorn_pid = gateway_stack.gunicorn.pid

    stopped = gateway_stack.stop_triton()
    try:
        for _ in range(4):
            down = detect(url, hopper_jpeg)
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "triton_unreachable"
            assert int(down.headers["Retry-After"]) > 0
            not_ready = ready(url)
            assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "triton_unreachable"
            assert int(not_ready.headers["Retry-After"]) > 0
        assert requests.get(url + "/healthz", timeout=10).status_code == 200  # alive: nothing to restart
    finally:
        gateway_stack.start_triton(same_ports_as=stopped)

    wait_until_ready_again(url)
    for _ in range(4):
        assert detect(url, hopper_jpeg).status_code == 200
    assert gateway_stack.gunicorn.pid == gunicorn_pid and gateway_stack.gunicorn.poll() is None


def wait_until_ready_again(url):
    started, consecutive = time.monotonic(), 0
    while consecutive < 6:  # several in a row, so every worker has found Triton again
        consecutive = consecutive + 1 if ready(url).status_code == 200 else 0
        assert time.monotonic() - started < RECOVERY_TIMEOUT_S, "gateway did not see Triton come back"
        time.sleep(0.1)


def test_triton_stopping_under_load_is_503_not_busy_nor_a_fault(gateway_stack, hopper_jpeg):
    """Eight clients keep sending while Triton shuts down gracefully: requests it turns away ("Server is
    stopping", a BLS call finding the server not ready, a cancelled call) are 503 with Retry-After, like Triton
    being gone, never 429 (busy), 502 or 500."""
    url, stopping = gateway_stack.url, threading.Event()
    answers: list[requests.Response] = []

    def client():
        with requests.Session() as session:
            while not stopping.is_set():
                answers.append(session.post(url + "/v1/detect", data=hopper_jpeg,
                                            headers={"Content-Type": "image/jpeg"}, timeout=60))

    with ThreadPoolExecutor(max_workers=8) as pool:
        running = [pool.submit(client) for _ in range(8)]
        deadline = time.monotonic() + 30
        while not any(answer.status_code == 200 for answer in list(answers)):  # served before the stop
            assert time.monotonic() < deadline, "no request was served before Triton was stopped"
            time.sleep(0.05)
        stopped = gateway_stack.stop_triton()
        time.sleep(0.5)
        stopping.set()
        for future in running:
            future.result()
    try:
        statuses = {answer.status_code for answer in answers}
        assert statuses <= {200, 503}, [(a.status_code, a.text) for a in answers if a.status_code not in (200, 503)]
        refused = [answer for answer in answers if answer.status_code == 503]
        assert refused and 200 in statuses  # served before the stop, turned away during it
        assert all(int(answer.headers["Retry-After"]) > 0 for answer in refused)
        assert {answer.json()["error"]["code"] for answer in refused} <= {"triton_unreachable", "model_not_ready"}
    finally:
        gateway_stack.start_triton(same_ports_as=stopped)
    wait_until_ready_again(url)
    assert detect(url, hopper_jpeg).status_code == 200


def test_a_missed_deadline_is_a_timeout(gateway_stack, real_images):
    """The per-request deadline (GATEWAY_TRITON_TIMEOUT_S) against the real Triton: 504, not a hang."""
    from gateway.errors import TritonTimeout, status_of
    from gateway.settings import Settings
    from gateway.triton_client import TritonDetector

    detector = TritonDetector(Settings(triton_url=gateway_stack.triton.grpc_url, triton_timeout_s=0.001))
    try:
        with pytest.raises(TritonTimeout) as caught:
            detector.detect(real_images["grace_hopper"])
        assert status_of(caught.value) == 504
    finally:
        detector.close()


def test_a_missed_deadline_over_http_is_504_and_the_worker_carries_on(gateway_stack, hopper_jpeg):
    """A gateway whose Triton deadline (1 ms) no inference can meet answers 504, then answers again."""
    overrides = {"GATEWAY_TRITON_TIMEOUT_S": "0.001"}
    impatient = Gunicorn(gateway_stack.environment(free_port(), overrides),
                         gateway_stack.log_dir / "impatient.log").start(ready_path="/healthz")
    try:
        for _ in range(2):
            late = detect(impatient.url, hopper_jpeg)
            assert late.status_code == 504, late.text
            assert late.json()["error"]["code"] == "triton_timeout"
        assert requests.get(impatient.url + "/healthz", timeout=10).status_code == 200
    finally:
        impatient.stop()
    assert detect(gateway_stack.url, hopper_jpeg).status_code == 200


def test_a_full_triton_queue_is_429_with_retry_after(tmp_path, hopper_jpeg):
    """A real queue limit, not a fake: face_detector may hold one queued request, so a burst overflows it."""
    variant = make_variant(tmp_path / "repository", merges=[
        "face_detector:dynamic_batching { default_queue_policy { max_queue_size: 1 } }"])
    with GatewayStack(variant, tmp_path, workers=2).running() as stack:
        before = _measured(stack.url)
        with ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(lambda _: detect(stack.url, hopper_jpeg), range(32)))
        statuses = {answer.status_code for answer in answers}
        assert statuses <= {200, 429}, [answer.text for answer in answers if answer.status_code not in (200, 429)]
        refused = [answer for answer in answers if answer.status_code == 429]
        assert refused, "no request overflowed a queue of one"
        assert all(answer.json()["error"]["code"] == "triton_overloaded" for answer in refused)
        assert all(int(answer.headers["Retry-After"]) > 0 for answer in refused)
        assert detect(stack.url, hopper_jpeg).status_code == 200
        # Triton's refusals are the service's failures: they count in the latency SLO's `total`, and every call
        # Triton answered, refused or not, in `triton`. The metrics are written just after each answer.
        expected = {"total": 33, "triton": 33, "triton_overloaded": len(refused)}
        deadline = time.monotonic() + 30
        while (counted := _measured(stack.url, before)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert counted == expected


def _measured(url: str, since: dict | None = None) -> dict:
    """Counts of the `total` and `triton` stages and of `triton_overloaded` errors, less those of `since`."""
    samples = scraped(url + "/metrics")
    counts = {stage: sample_sum(samples, "gateway_stage_duration_seconds_count", stage=stage)
              for stage in ("total", "triton")}
    counts["triton_overloaded"] = sample_sum(samples, "gateway_errors_total", code="triton_overloaded", kind="upstream")
    return {key: round(value - (since or {}).get(key, 0)) for key, value in counts.items()}
