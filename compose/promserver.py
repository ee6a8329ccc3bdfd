"""A real `prometheus` process on loopback for tests: start it with a config, query it, stop it.

    from promserver import PrometheusServer       # (load this file by path: compose/ is not a package)
    with PrometheusServer(scrape_targets={"gateway": "127.0.0.1:8080"}, rule_files=[...]) as prom:
        prom.wait_for_target_up("gateway")
        result = prom.query('sum(rate(flask_http_request_total[1m]))')

The binary comes from Debian's `prometheus` package (or PROMETHEUS_BINARY). Only the standard library.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or answered a query with an error (the message has its reason)."""

    def __init__(self, message: str, *, error_type: str | None = None, status: int | None = None):
        super().__init__(message)
        self.error_type = error_type  # e.g. "bad_data" for a PromQL parse error
        self.status = status


def prometheus_binary() -> str | None:
    return os.environ.get("PROMETHEUS_BINARY") or shutil.which("prometheus")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """`prometheus` on 127.0.0.1 with a generated config; use as a context manager."""

    def __init__(self, *, scrape_targets: Mapping[str, str] | None = None, rule_files: Sequence[Path] = (),
                 scrape_interval: str = "1s", evaluation_interval: str = "1s", extra_args: Sequence[str] = (),
                 ready_timeout: float = 30.0):
        self.scrape_targets = dict(scrape_targets or {})
        self.rule_files = [Path(path).resolve() for path in rule_files]
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.port: int | None = None
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        """The YAML config (JSON is valid YAML): one job per scrape target, the given rule files."""
        config = {
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.evaluation_interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in self.scrape_targets.items()],
        }
        return json.dumps(config, indent=2)

    def __enter__(self) -> "PrometheusServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("the `prometheus` binary is not installed (Debian package `prometheus`)")
        self._workdir = Path(tempfile.mkdtemp(prefix="prometheus-test-"))
        config = self._workdir / "prometheus.yml"
        config.write_text(self.config_text())
        log_path = self._workdir / "prometheus.log"
        for attempt in range(3):  # the free port can be taken between picking and binding
            self.port = _free_port()
            command = [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{self.port}",
                       f"--storage.tsdb.path={self._workdir / 'data'}", "--log.level=warn", *self.extra_args]
            with open(log_path, "wb") as log:
                self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                 start_new_session=True)
            if self._wait_ready():
                return
            self._kill()
        log = log_path.read_text(errors="replace")[-3000:]
        self.stop()
        raise PrometheusError(f"prometheus did not become ready:\n{log}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        return False

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        self._kill()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # Endpoints that take their (possibly long) parameters as a POST form; the others answer GET only.
    POST_ENDPOINTS = frozenset({"query", "query_range", "query_exemplars", "series", "labels"})

    def api(self, path: str, params: Mapping[str, str] | None = None) -> dict:
        """/api/v1/<path> (POST form for queries, GET otherwise); returns `data`, raises PrometheusError
        (with errorType) on an error answer."""
        url = f"{self.url}/api/v1/{path}"
        encoded = urllib.parse.urlencode(params or {})
        if path in self.POST_ENDPOINTS:
            request = urllib.request.Request(url, data=encoded.encode(), method="POST",
                                             headers={"Content-Type": "application/x-www-form-urlencoded"})
        else:
            request = urllib.request.Request(url + (f"?{encoded}" if encoded else ""), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                payload, status = json.loads(response.read()), response.status
        except urllib.error.HTTPError as exc:
            payload, status = json.loads(exc.read() or b"{}"), exc.code
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params or {})}: {payload.get('errorType')}: {payload.get('error')}",
                                  error_type=payload.get("errorType"), status=status)
        return payload["data"]

    def query(self, expr: str, time_: float | None = None) -> dict:
        """An instant query: {'resultType': ..., 'result': [...]}."""
        params = {"query": expr}
        if time_ is not None:
            params["time"] = f"{time_:.3f}"
        return self.api("query", params)

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for_target_up(self, job: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = [target for target in self.targets() if target["labels"].get("job") == job]
            if last and all(target["health"] == "up" for target in last):
                return
            time.sleep(0.2)
        raise PrometheusError(f"job {job!r} not up after {timeout:.0f} s: {last}")
