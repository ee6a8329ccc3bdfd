"""TritonServer and its CLI: start, stop, and errors that name their cause."""
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from ensemble.triton.launcher import TraceSettings, TritonServer, TritonStartError, python_backend_regions
from triton_helpers import write_echo_model, write_model

pytestmark = pytest.mark.triton

BROKEN_REASON = "priors file is missing (raised on purpose)"
BROKEN_CONFIG = """
    name: "broken"
    backend: "python"
    max_batch_size: 0
    input [ { name: "X", data_type: TYPE_FP32, dims: [ 2 ] } ]
    output [ { name: "Y", data_type: TYPE_FP32, dims: [ 2 ] } ]
"""
BROKEN_MODEL = f"""
    class TritonPythonModel:
        def initialize(self, args):
            raise FileNotFoundError("{BROKEN_REASON}")
"""


@pytest.fixture()
def echo_repository(tmp_path):
    write_echo_model(tmp_path / "models")
    return tmp_path / "models"


def test_port_taken_is_reported_before_starting(echo_repository):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(TritonStartError, match=rf"grpc port {port} .*already in use"):
            TritonServer(echo_repository, grpc_port=port).start()


def test_model_that_fails_to_load_reports_tritons_reason(echo_repository):
    write_model(echo_repository, "broken", BROKEN_CONFIG, {"1/model.py": BROKEN_MODEL})
    with pytest.raises(TritonStartError) as error:
        TritonServer(echo_repository, ready_timeout=60).start()
    assert "model 'broken' failed to load" in str(error.value)
    assert f"FileNotFoundError: {BROKEN_REASON}" in str(error.value)


def test_server_exiting_early_reports_its_log(echo_repository):
    with pytest.raises(TritonStartError, match=r"exited with code \d+ before it was ready(.|\n)*model-control-mode"):
        TritonServer(echo_repository, extra_args=["--model-control-mode=bogus"]).start()


def test_missing_binary_is_named(echo_repository, tmp_path):
    with pytest.raises(TritonStartError, match="does not exist"):
        TritonServer(echo_repository, tritonserver=tmp_path / "no" / "tritonserver").start()


def test_trace_settings_become_trace_config_flags():
    flags = TraceSettings("127.0.0.1:4318/v1/traces", rate=1, level="TIMESTAMPS", bsp_schedule_delay_ms=200).arguments()
    assert flags == ["--trace-config", "mode=opentelemetry", "--trace-config", "rate=1",
                     "--trace-config", "level=TIMESTAMPS",
                     "--trace-config", "opentelemetry,url=127.0.0.1:4318/v1/traces",
                     "--trace-config", "opentelemetry,bsp_schedule_delay=200"]


def start_cli(repository, log_file) -> tuple[subprocess.Popen, dict[str, str], list[str]]:
    """`python -m ensemble.triton.launcher` on free ports, once it has printed its URLs."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "ensemble.triton.launcher", "--model-repository", str(repository),
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--log-file", str(log_file),
         "--ready-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [cli.stdout.readline()]  # "tritonserver ready in ..." or an error, then EOF
    while lines[-1] and not lines[-1].lstrip().startswith("log"):
        lines.append(cli.stdout.readline())
    urls = dict(line.split() for line in lines[1:] if line.startswith("  "))
    return cli, urls, lines


def refuses_connections(url: str, within_s: float) -> bool:
    host, port = url.rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex((host, int(port))) != 0:
                return True
        time.sleep(0.2)
    return False


def test_restart_on_the_same_ports(echo_repository):
    server = TritonServer(echo_repository)
    with server:
        ports = dict(server.ports)
        assert urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5).status == 200
    with server:  # the old connections may linger in TIME_WAIT; tritonserver, and the port check, accept that
        assert server.ports == ports


def group_is_gone(group: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_stop_after_tritonserver_was_killed_leaves_no_stub_nor_shared_memory(echo_repository):
    """A tritonserver SIGKILLed (as the OOM killer does) leaves its Python-backend stubs and their /dev/shm pools."""
    server = TritonServer(echo_repository)
    server.start()
    group = server._process.pid
    regions = python_backend_regions(group)
    assert regions and all(region.exists() for region in regions)
    os.kill(group, signal.SIGKILL)
    server._process.wait()
    assert all(region.exists() for region in regions)  # what Triton itself leaves after such a death
    server.stop()
    assert not [region for region in regions if region.exists()]
    assert group_is_gone(group, within_s=20)  # the stubs were killed with the group (init reaps them)


def test_server_goes_when_its_starter_is_killed_and_its_folder_with_the_next_start(echo_repository, tmp_path):
    """A killed starter cannot stop() its server: the kernel's parent-death signal stops Triton, and the next
    TritonServer to start removes the temporary folder it left (it used to stay in /tmp for good)."""
    import glob
    import tempfile

    def workdirs() -> set[str]:
        return set(glob.glob(os.path.join(tempfile.gettempdir(), "tritonserver-*")))

    before = workdirs()
    cli, urls, lines = start_cli(echo_repository, tmp_path / "triton.log")
    try:
        assert set(urls) == {"grpc", "http", "metrics", "log"}, "".join(lines)
    finally:
        cli.kill()
        cli.communicate()
    assert refuses_connections(urls["grpc"], within_s=40)
    (abandoned,) = workdirs() - before
    assert int(open(os.path.join(abandoned, "owner.pid")).read()) == cli.pid
    with TritonServer(echo_repository) as server:
        assert not os.path.exists(abandoned)
        assert os.path.isdir(str(server._workdir))  # its own, owned by a live process, is kept


def test_cli_serves_until_sigterm_then_exits_cleanly(echo_repository, tmp_path):
    log_file = tmp_path / "triton.log"
    cli, urls, lines = start_cli(echo_repository, log_file)
    try:
        assert set(urls) == {"grpc", "http", "metrics", "log"}, "".join(lines)
        assert urllib.request.urlopen(f"{urls['http']}/v2/health/ready", timeout=5).status == 200
        assert urllib.request.urlopen(urls["metrics"], timeout=5).status == 200
        cli.send_signal(signal.SIGTERM)
        output, _ = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, "".join(lines) + output
    assert "tritonserver stopped (exit code 0)" in output
    assert refuses_connections(urls["grpc"], within_s=0.5)
    assert "Signal (15) received" in log_file.read_text()
