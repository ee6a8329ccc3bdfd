"""Start and stop a real tritonserver for the service, tests and benchmarks, with errors that say what went wrong."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ensemble.triton.staging import stage_runtime_repository

CANONICAL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
STOP_GRACE_S = 40.0  # Triton itself waits up to 30 s (--exit-timeout-secs) for in-flight requests
LOG_TAIL_LINES = 40
SHARED_MEMORY_DIR = Path("/dev/shm")
PYTHON_BACKEND_REGION_PREFIX = "triton_python_backend_shm_region_"  # how the Python backend names its /dev/shm pools
FAILED_LOAD = re.compile(r"failed to load '(?P<model>[^']+)' version \d+: (?P<reason>.*?)\"?$")


class TritonStartError(RuntimeError):
    """tritonserver could not be started or did not become ready; the message says why."""


@dataclass(frozen=True)
class TraceSettings:
    """Triton's OpenTelemetry tracing: spans go to an OTLP/HTTP collector at `url` (host:port/v1/traces)."""

    url: str
    rate: int = 1  # trace every `rate`-th request; requests with a traceparent header are traced regardless
    level: str = "TIMESTAMPS"
    bsp_schedule_delay_ms: int = 200  # batch span processor flush delay
    mode: str = "opentelemetry"

    def arguments(self) -> list[str]:
        """The `--trace-config` flags, in the form verified against tritonserver 2.51."""
        settings = [f"mode={self.mode}", f"rate={self.rate}", f"level={self.level}",
                    f"opentelemetry,url={self.url}",
                    f"opentelemetry,bsp_schedule_delay={self.bsp_schedule_delay_ms}"]
        return [argument for setting in settings for argument in ("--trace-config", setting)]


def pytriton_root() -> Path:
    """Where the nvidia-pytriton wheel keeps its tritonserver build (found without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed, and no --tritonserver binary was given")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def is_full_build(binary: Path) -> bool:
    """A full Triton build (e.g. the NGC container) has the onnxruntime backend beside its binary."""
    return (binary.resolve().parent.parent / "backends" / "onnxruntime").is_dir()


def python_backend_directory(dest: Path) -> Path:
    """A backend directory holding pytriton's Python backend plus the stub for this interpreter's version."""
    root = pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = root / "backends" / "python"
    for required in (stub, backend / "libtriton_python.so"):
        if not required.is_file():
            raise TritonStartError(f"{required} is missing: nvidia-pytriton has no Python backend for Python {version}")
    shutil.copytree(backend, dest / "python", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, dest / "python" / stub.name)
    return dest


WORKDIR_PREFIX = "tritonserver-"  # each TritonServer's temporary folder: staged repository, log
OWNER_FILE = "owner.pid"  # in it: the pid of the process that made it


def remove_abandoned_workdirs() -> None:
    """Remove the temporary folders of TritonServers whose owner died without stop() (killed: SIGKILL, OOM)."""
    for owner in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*/{OWNER_FILE}"):
        try:
            pid = int(owner.read_text())
            os.kill(pid, 0)
        except ProcessLookupError:  # the owner is gone: nothing will remove it otherwise
            shutil.rmtree(owner.parent, ignore_errors=True)
        except (OSError, ValueError):  # not ours to judge (another user's, half written): left alone
            pass


@contextlib.contextmanager
def interrupting_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block: a start-up can be cut short (its own cleanup
    runs), where a handler that only sets a flag would be heard once the waiting is over."""
    def interrupt(*_):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_requested_by_signals() -> threading.Event:
    """An event SIGINT and SIGTERM set from now on: a serving loop stops at its next look, cleanly."""
    stop_requested = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())
    return stop_requested


def require_free_port(host: str, port: int, purpose: str) -> None:
    """Fail before starting when another process already holds `port`."""
    with socket.socket() as sock:
        # As tritonserver binds: SO_REUSEADDR lets a port whose old connections linger in TIME_WAIT pass,
        # while a port someone listens on still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise TritonStartError(f"{purpose} port {port} on {host} is already in use ({exc.strerror})") from exc


class TritonServer:
    """A tritonserver process serving the model repository; use as a context manager.

    Start it from a thread that lives as long as the server: tritonserver is told to exit when that thread
    ends, so a test run killed without teardown leaves no server behind.
    """

    def __init__(self, model_repository: Path = CANONICAL_REPOSITORY, *, http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, host: str = "127.0.0.1", log_file: Path | None = None,
                 tritonserver: Path | None = None, trace: TraceSettings | None = None,
                 ready_timeout: float = 120, extra_args: Sequence[str] = ()):
        self.model_repository = Path(model_repository).resolve()
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.host = host
        self.log_file = Path(log_file) if log_file else None
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.trace = trace
        self.ready_timeout = ready_timeout
        self.extra_args = list(extra_args)
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_path: Path | None = None

    @property
    def client_host(self) -> str:
        """Where clients on this machine connect (a wildcard bind is reached through loopback)."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['http']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['metrics']}/metrics"

    @property
    def log_path(self) -> Path | None:
        """Triton's log (stdout and stderr, Python models' prints included)."""
        return self._log_path

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Stage (for pytriton's build), launch, and wait until every model is ready."""
        if self._process is not None:
            raise TritonStartError("this TritonServer is already started")
        began = time.monotonic()
        remove_abandoned_workdirs()
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        (self._workdir / OWNER_FILE).write_text(str(os.getpid()))
        try:
            self._claim_ports()
            command, env = self._command()
            self._log_path = self.log_file or self._workdir / "tritonserver.log"
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "wb") as log:
                self._process = subprocess.Popen(with_parent_death_signal(command), stdout=log,
                                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self._wait_until_ready()
        except BaseException:
            self.stop(grace=5)
            raise
        self.startup_s = time.monotonic() - began

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, SIGKILL after `grace` seconds; returns tritonserver's exit code (None if never started).

        Also removes what a tritonserver that died without cleaning up (SIGKILL, the OOM killer) leaves behind:
        its Python-backend stubs (killed with the process group) and their shared-memory pools in /dev/shm.
        """
        process, self._process = self._process, None
        code = None
        if process is not None:
            regions = python_backend_regions(process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                code = None
            # tritonserver and its Python-backend stubs are one process group that this class created.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if code is None:
                code = process.wait()
            for region in regions:  # a clean exit has removed them already
                region.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def _claim_ports(self) -> None:
        """Check the given ports are free; let the kernel pick distinct free ones for those left at 0."""
        for purpose, port in self.ports.items():
            if port:
                require_free_port(self.host, port, purpose)
        with contextlib.ExitStack() as held:  # held open until all are picked, so no two picks coincide
            for purpose, port in self.ports.items():
                if not port:
                    sock = held.enter_context(socket.socket())
                    sock.bind((self.host, 0))
                    self.ports[purpose] = sock.getsockname()[1]

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The tritonserver command line and environment for this build."""
        env = dict(os.environ)
        # The Python-backend stub takes the interpreter (and so the venv's site-packages) from PATH.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        binary = self.tritonserver or pytriton_root() / "bin" / "tritonserver"
        if not binary.is_file():
            raise TritonStartError(f"tritonserver binary {binary} does not exist")
        command = [str(binary)]
        if is_full_build(binary):
            command.append(f"--model-repository={self.model_repository}")
        else:
            repository = stage_runtime_repository(self.model_repository, self._workdir / "models")
            backends = python_backend_directory(self._workdir / "backends")
            libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
            command += [f"--model-repository={repository}", f"--backend-directory={backends}"]
        command += [f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
                    f"--metrics-port={self.ports['metrics']}", f"--http-address={self.host}",
                    f"--grpc-address={self.host}", f"--metrics-address={self.host}"]
        command += self.trace.arguments() if self.trace else []
        return command + self.extra_args, env

    def _wait_until_ready(self) -> None:
        """Poll /v2/health/ready, then the metrics endpoint; fail fast on an early exit or a model that could not load.

        tritonserver starts its metrics service a few tens of milliseconds after the HTTP one reports ready.
        """
        deadline = time.monotonic() + self.ready_timeout
        while self._http_ok("/v2/health/ready") is None or not self._metrics_ok():
            code = self._process.poll()
            if code is not None:
                raise TritonStartError(self._failure_report(f"exited with code {code} before it was ready"))
            if self._http_ok("/v2/health/live") is not None:
                unavailable = self._unavailable_models()
                if unavailable:
                    raise TritonStartError(self._failure_report("is live but not ready", unavailable))
            if time.monotonic() > deadline:
                raise TritonStartError(self._failure_report(f"was not ready after {self.ready_timeout:.0f} s"))
            time.sleep(0.2)

    def _metrics_ok(self) -> bool:
        if "--allow-metrics=false" in self.extra_args:
            return True
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _http_ok(self, path: str, data: bytes | None = None) -> bytes | None:
        """The response body of a 200 from Triton's HTTP endpoint, None for anything else."""
        try:
            with urllib.request.urlopen(self.http_url + path, data=data, timeout=2) as response:
                return response.read() if response.status == 200 else None
        except (urllib.error.URLError, OSError):
            return None

    def exit_report(self) -> str:
        """Why a server that was serving is gone: its exit code and the end of its log, read before stop() removes a
        temporary log."""
        code = self._process.poll() if self._process is not None else None
        return self._failure_report(f"exited unexpectedly with code {code}")

    def _unavailable_models(self) -> dict[str, str]:
        """Models the repository index reports UNAVAILABLE, with Triton's reason (seen with --exit-on-error=false)."""
        body = self._http_ok("/v2/repository/index", data=b"{}")
        entries = json.loads(body) if body else []
        return {entry["name"]: entry.get("reason", "") for entry in entries if entry.get("state") == "UNAVAILABLE"}

    def _failure_report(self, what: str, unavailable: dict[str, str] | None = None) -> str:
        """Triton's own reasons for models that failed to load, else the log tail."""
        lines = self._log_path.read_text(errors="replace").splitlines() if self._log_path.exists() else []
        where = f" (log: {self._log_path})" if self.log_file else ""  # a temporary log is gone after stop()
        failed = dict(unavailable or {})
        for line in lines:
            match = FAILED_LOAD.search(line)
            if match:
                failed.setdefault(match["model"], match["reason"].replace("\\n", "\n").strip())
        if failed:
            reasons = "; ".join(f"model {name!r} failed to load: {reason}" for name, reason in failed.items())
            return f"tritonserver {what}: {reasons}{where}"
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"tritonserver {what}{where}; last lines:\n{tail}"


def python_backend_regions(process_group: int) -> list[Path]:
    """The /dev/shm pools named on the command lines of the Python-backend stubs in `process_group`."""
    regions = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            group = int(stat.read_text().rsplit(")", 1)[1].split()[2])  # after "pid (comm)": state, ppid, pgrp
            arguments = (stat.parent / "cmdline").read_bytes().split(b"\0") if group == process_group else []
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        regions += [SHARED_MEMORY_DIR / name.decode() for name in arguments
                    if name.startswith(PYTHON_BACKEND_REGION_PREFIX.encode())]
    return regions


def with_parent_death_signal(command: Sequence[str]) -> list[str]:
    """`command` set to get SIGTERM when the thread that starts it dies, so a killed launcher or test run leaves no
    server. setpriv (util-linux) sets the signal and execs the command in the same process.

    Done by a program rather than a Popen preexec_fn: a preexec_fn makes subprocess fork(), which runs every
    pthread_atfork handler, and gRPC's can block forever in a process whose gRPC threads are busy (a test run
    hung there). Without one, subprocess starts the child with vfork, which runs none.
    """
    return ["setpriv", "--pdeathsig", "TERM", "--", *command]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: serve until SIGINT/SIGTERM, then shut Triton down cleanly."""
    parser = argparse.ArgumentParser(prog="python -m ensemble.triton.launcher", description=__doc__)
    parser.add_argument("--model-repository", type=Path, default=CANONICAL_REPOSITORY)
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--tritonserver", type=Path, help="a full Triton build; default: nvidia-pytriton's")
    parser.add_argument("--log-file", type=Path)
    parser.add_argument("--ready-timeout", type=float, default=120)
    parser.add_argument("--trace-url", help="OTLP/HTTP collector, host:port/v1/traces; enables tracing")
    parser.add_argument("--trace-rate", type=int, default=1)
    parser.add_argument("--trace-level", default="TIMESTAMPS")
    args = parser.parse_args(argv)

    trace = TraceSettings(args.trace_url, rate=args.trace_rate, level=args.trace_level) if args.trace_url else None
    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, host=args.host, log_file=args.log_file,
                          tritonserver=args.tritonserver, trace=trace, ready_timeout=args.ready_timeout)
    with interrupting_signals():
        try:
            server.start()  # stops what it started when interrupted
        except TritonStartError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted while starting; stopped", file=sys.stderr)
            return 130
    stop_requested = stop_requested_by_signals()
    print(f"tritonserver ready in {server.startup_s:.1f} s\n  grpc    {server.grpc_url}\n"
          f"  http    {server.http_url}\n  metrics {server.metrics_url}\n  log     {server.log_path}", flush=True)
    while not stop_requested.wait(0.5):
        if not server.running:
            print(f"error: {server.exit_report()}", file=sys.stderr)
            server.stop()
            return 1
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})", flush=True)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
