"""GATEWAY_METRICS_PORT: the merged /metrics from a process of its own, answering while every worker thread waits."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from gateway_helpers import (REPO_ROOT, Gunicorn, children, free_port, metric_samples, pgrep, sample_sum,
                             scraped)
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

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


def test_the_metrics_port_serves_the_merged_page_of_the_api_port(gateway, hopper_jpeg):
    answer = requests.post(gateway.url + "/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"},
                           timeout=60)
    assert answer.status_code == 200
    # the answer's metrics are written just after it went out
    deadline = time.monotonic() + 10
    while (own := metric_samples(page := requests.get(gateway.metrics_url, timeout=10).text)).get(
            ("gateway_faces_per_image_count", ())) != 1.0:
        assert time.monotonic() < deadline, "the detection never showed on the metrics port"
        time.sleep(0.1)
    api = scraped(gateway.url + "/metrics")
    counted = ("flask_http_request_total", (("method", "POST"), ("status", "200")))
    assert own[counted] == api[counted] == 1.0  # the worker's files, read by another process
    assert own[("gateway_triton_metrics_up", ())] == 1.0
    assert '\nnv_inference_count{model="mask_detection"' in page  # Triton's page, fetched by this process
    openmetrics = requests.get(gateway.metrics_url, headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    only = requests.get(gateway.metrics_url, params={"name[]": "gateway_inflight_requests"}, timeout=10).text
    assert {name for name, _ in metric_samples(only)} == {"gateway_inflight_requests"}
    assert requests.get(gateway.metrics_url.replace("/metrics", "/v1/detect"), timeout=10).status_code == 404


def test_the_metrics_port_answers_while_every_worker_thread_is_busy(gateway):
    """What the port is for: with each thread held (here by stalled uploads; in production by a hung Triton), a
    scrape of the API port waits in the queue, and the metrics port still shows what is going on."""
    (worker,) = set(children(gateway.process.pid)) - set(_metrics_processes(gateway.process.pid))
    oldest = ("gateway_worker_oldest_request_start_timestamp_seconds", (("pid", str(worker)),))
    last_answer = ("gateway_worker_last_answer_timestamp_seconds", (("pid", str(worker)),))
    answered_before = scraped(gateway.metrics_url)[last_answer]
    sent_at = time.time()
    stalled = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(THREADS)]
    try:
        for connection in stalled:
            connection.sendall(STALLED)
        deadline = time.monotonic() + 20
        while scraped(gateway.metrics_url)[("gateway_inflight_requests", ())] != THREADS:
            assert time.monotonic() < deadline, "the stalled uploads never showed as in flight"
            time.sleep(0.1)
        # ... against the capacity they exhaust: the saturation the alert GatewayThreadsSaturated watches is 1
        page = scraped(gateway.metrics_url)
        assert page[("gateway_worker_threads", ())] == THREADS
        # the worker's oldest request is the first stalled upload: GatewayRequestHung / GatewayStalled read its age
        assert sent_at - 1 <= page[oldest] <= time.time() and page[last_answer] == answered_before
        with pytest.raises(requests.Timeout):  # queued behind the stalled uploads for CLIENT_TIMEOUT_S
            requests.get(gateway.url + "/metrics", timeout=3)
    finally:
        for connection in stalled:
            connection.close()
    # the uploads broke off: their (failed) requests end, the queued scrape is answered, nothing is left in flight
    deadline = time.monotonic() + 30
    while (page := scraped(gateway.metrics_url))[oldest] != 0:
        assert time.monotonic() < deadline, "the broken-off uploads never ended"
        time.sleep(0.1)
    assert page[last_answer] > answered_before


def _metrics_processes(master: int) -> list[int]:
    """The children of `master` running gateway.metrics_server."""
    return pgrep("-P", str(master), "-f", r"gateway\.metrics_server")


def _replaced(gateway, dead: int) -> int:
    """The metrics process that took over from `dead`, once it serves the port."""
    deadline = time.monotonic() + 30
    while True:
        replaced = [pid for pid in _metrics_processes(gateway.process.pid) if pid != dead]
        try:
            if replaced and requests.get(gateway.metrics_url, timeout=5).status_code == 200:
                return replaced[0]
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "no new metrics process served the port"
        time.sleep(0.2)


def test_a_metrics_process_that_dies_is_replaced_and_one_that_keeps_dying_waits_longer(gateway):
    """A child that binds and then dies at once (a crash loop) is restarted after 1 s, then 2 s, ...: the backoff
    grows with early deaths too, not only with failed starts."""
    (first,) = _metrics_processes(gateway.process.pid)
    os.kill(first, signal.SIGKILL)
    second = _replaced(gateway, first)
    os.kill(second, signal.SIGKILL)
    _replaced(gateway, second)
    log = gateway.log_text()
    assert f"gateway.metrics_server (pid {first}) exited with code" in log
    assert re.search(rf"\(pid {first}\) exited with code -?\d+; starting another in 1 s", log)
    assert re.search(rf"\(pid {second}\) exited with code -?\d+; starting another in 2 s", log)


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


STALE_DETECTIONS = 12345.0


def test_a_given_metrics_directory_is_emptied_of_a_previous_runs_files_at_start(gateway_stack, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR from the caller (a volume, say) may hold a previous run's files: left there, their
    counts would be summed into this run's, as if a dead worker's requests had been served now."""
    stale = tmp_path / "counter_99999.db"  # prometheus_client's name for a counter file of process 99999
    counts = MmapedDict(str(stale))
    counts.write_value(mmap_key("gateway_detections", "gateway_detections_total", ["label"], ["mask"],
                                "Labelled faces by classifier label"), STALE_DETECTIONS, 0.0)
    counts.close()
    (tmp_path / "exemplars_99999.json").write_text(
        '[["gateway_stage_duration_seconds_bucket",[["le","0.1"],["stage","total"]],"%s",0.05,0]]' % ("ab" * 16))
    (tmp_path / "notes.txt").write_text("not prometheus_client's")
    read_if_left = [sample.value for family in MultiProcessCollector(None, str(tmp_path)).collect()
                    for sample in family.samples if sample.name == "gateway_detections_total"]
    assert read_if_left == [STALE_DETECTIONS]

    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    started = Gunicorn(env, gateway_stack.log_dir / "metrics_dir_stale.log").start()
    try:
        assert not stale.exists() and not (tmp_path / "exemplars_99999.json").exists()
        assert (tmp_path / "notes.txt").exists()  # only prometheus_client's files and the exemplars are removed
        assert list(tmp_path.glob("*.db"))  # the new worker's own files, in the directory the caller gave
        assert sample_sum(scraped(started.url + "/metrics"), "gateway_detections_total") == 0
    finally:
        assert started.stop() == 0
    assert (tmp_path / "notes.txt").exists()  # the caller's directory is not removed at exit


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for a parent that is not this test counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_binary_upgrade_gives_the_new_master_its_own_metrics_directory(gateway_stack, hopper_jpeg, tmp_path):
    """USR2 after a HUP starts a new master with the old one's environment, metrics directory included: it makes
    its own, so the old master's exit removes only its own directory and the new master goes on counting.

    Started as compose starts it, by gunicorn's console script: re-executed as `python .../gunicorn/__main__.py`
    (what `python -m gunicorn` leaves in sys.argv), the new master would find gunicorn's `http` package first
    on its path and fail to import the standard library's.
    """
    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "TMPDIR": str(tmp_path)})
    url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
    command = [str(Path(sys.executable).with_name("gunicorn")), "-c", str(REPO_ROOT / "gateway" / "gunicorn.conf.py"),
               "gateway:create_app()"]
    with open(gateway_stack.log_dir / "metrics_dir_usr2.log", "wb") as log:
        old = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    new_master = None
    try:
        deadline = time.monotonic() + 60
        while not _answers(url + "/readyz"):
            assert old.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
            time.sleep(0.2)
        (made_by_old,) = tmp_path.glob("gateway-prometheus-*")
        # a HUP first: gunicorn's new Config then records the environment with the directory in it, and a USR2
        # hands that environment to the new master
        first_workers = set(children(old.pid))
        old.send_signal(signal.SIGHUP)
        while set(children(old.pid)) & first_workers or not children(old.pid):
            assert time.monotonic() < deadline + 30, "the workers were not replaced after HUP"
            time.sleep(0.2)
        old_workers = set(children(old.pid))
        old.send_signal(signal.SIGUSR2)
        while new_master is None or not children(new_master):
            assert time.monotonic() < deadline + 60, "no new master with workers after USR2"
            time.sleep(0.2)
            new_master = next(iter(set(children(old.pid)) - old_workers), None)
        old.send_signal(signal.SIGTERM)
        assert old.wait(timeout=60) == 0
        assert not made_by_old.exists()
        (made_by_new,) = tmp_path.glob("gateway-prometheus-*")
        answer = requests.post(url + "/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"},
                               timeout=60)
        assert answer.status_code == 200  # served by the new master's worker, which writes to its own directory
        deadline = time.monotonic() + 10
        while not list(made_by_new.glob("counter_*.db")):
            assert time.monotonic() < deadline, "the new master's worker wrote no metrics file"
            time.sleep(0.1)
        os.kill(new_master, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not _gone(new_master):
            assert time.monotonic() < deadline, "the new master did not stop"
            time.sleep(0.2)
        new_master = None
        assert not made_by_new.exists()
    finally:
        if new_master is not None and not _gone(new_master):
            os.kill(new_master, signal.SIGKILL)
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait()


def test_a_daemonized_gateway_removes_its_metrics_directory_at_exit(gateway_stack, tmp_path):
    """`--daemon` forks the master off after gunicorn.conf.py made the directory: the marker must name that master,
    or its exit would leave the directory behind."""
    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "TMPDIR": str(tmp_path)})
    url = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
    pidfile = tmp_path / "gunicorn.pid"
    command = [str(Path(sys.executable).with_name("gunicorn")), "-c", str(REPO_ROOT / "gateway" / "gunicorn.conf.py"),
               "--daemon", "--pid", str(pidfile), "--error-logfile", str(tmp_path / "error.log"),
               "gateway:create_app()"]
    assert subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=60).returncode == 0  # returns once daemonized
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and _answers(url + "/readyz")):
            assert time.monotonic() < deadline, "the daemonized gunicorn did not start"
            time.sleep(0.2)
        master = int(pidfile.read_text())
        (made,) = tmp_path.glob("gateway-prometheus-*")
        assert int((made / ".made-by-gunicorn-master").read_text()) == master
        os.kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while not _gone(master):
            assert time.monotonic() < deadline, "the daemonized master did not stop"
            time.sleep(0.2)
        assert not made.exists()
    finally:  # a daemon is nobody's child: whatever failed above, it must not outlive the test
        for pid in pgrep("-f", re.escape(str(pidfile))):  # its master and workers, found by the flags they share
            os.kill(pid, signal.SIGKILL)


def _answers(url: str) -> bool:
    """Whether `url` answers 200 now; not listening yet, or a first answer slower than 10 s on a busy machine
    (seen in CI), is a no to ask again, not a failure."""
    try:
        return requests.get(url, timeout=10).status_code == 200
    except requests.RequestException:
        return False
