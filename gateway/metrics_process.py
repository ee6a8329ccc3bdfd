"""gunicorn's master side of GATEWAY_METRICS_PORT: start `python -m gateway.metrics_server`, restart it, stop it.

Kept in this module, not in gunicorn.conf.py: a HUP re-reads the config file into fresh globals, and the child
must still be found by the hooks of the reloaded config. A binary upgrade (USR2) is not supported with a metrics
port: the new master cannot bind the port the old one's child holds, and refuses to start.
"""
from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import threading
import time

READY = b"ready\n"  # what the child writes to its --ready-fd once its port is bound
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RESTART_DELAY_S = 1.0  # after the child died, before a new one; doubled after each failed start or early death ...
MAX_RESTART_DELAY_S = 60.0  # ... up to this, so a port that stays taken costs little
STABLE_S = 60.0  # a child that served this long before dying starts the delays over

log = logging.getLogger("gunicorn.error")  # the master's log, where gunicorn writes its own lines


class MetricsServerFailed(RuntimeError):
    """The metrics server did not bind its port (taken, or the process failed): gunicorn must not start."""


class _Supervisor:
    """The one child of this master that serves the metrics port, restarted whenever it dies."""

    def __init__(self, port: int):
        self.port = port
        self.process: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Start the child and wait until it serves; then watch it from a thread that restarts it."""
        self.process = _spawn(self.port)
        self._watcher = threading.Thread(target=self._watch, name="metrics-server-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        delay = RESTART_DELAY_S
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self.process.wait()  # 0 also where gunicorn's own reaping took the exit status first
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_S:
                delay = RESTART_DELAY_S
            log.error("gateway.metrics_server (pid %s) exited with code %s; starting another in %.0f s",
                      self.process.pid, code, delay)
            while not self._stopping.wait(delay):
                try:
                    self.process = _spawn(self.port)
                except Exception as error:  # this thread must outlive any one failure
                    delay = min(delay * 2, MAX_RESTART_DELAY_S)
                    log.error("%s; trying again in %.0f s", error, delay)
                    continue
                if self._stopping.is_set():  # stop() came while this one started: it saw the old process only
                    _terminate(self.process)
                # should this one die within STABLE_S too (it binds, then crashes), the next waits longer
                delay = min(delay * 2, MAX_RESTART_DELAY_S)
                break

    def stop(self) -> None:
        """No more restarts; the running child is terminated, and one being started is waited for and stopped."""
        self._stopping.set()
        if self.process is not None:
            _terminate(self.process)
        if self._watcher is not None:
            self._watcher.join(START_TIMEOUT_S + 2 * STOP_TIMEOUT_S)


_supervisor: _Supervisor | None = None


def start(port: int) -> None:
    """Serve the metrics port from a child of this (gunicorn's master) process; raises MetricsServerFailed."""
    global _supervisor
    if _supervisor is not None:
        return
    supervisor = _Supervisor(port)
    supervisor.start()
    _supervisor = supervisor
    log.info("metrics on port %s (gateway.metrics_server, pid %s)", port, supervisor.process.pid)


def stop() -> None:
    """Stop the child, if this process started one (gunicorn's on_exit)."""
    global _supervisor
    if _supervisor is not None:
        _supervisor.stop()
        _supervisor = None


def _terminate(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it overstays STOP_TIMEOUT_S."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _spawn(port: int) -> subprocess.Popen:
    """The child, once it has said it serves: it writes READY to a pipe after binding (a connection test could
    reach whatever else holds the port). The child reads its settings, port included, from the environment."""
    ready_read, ready_write = os.pipe()
    process = None
    try:
        # Its own session: a Ctrl-C to a foreground gunicorn reaches the master, which stops it, not it directly.
        process = subprocess.Popen([sys.executable, "-m", "gateway.metrics_server", "--ready-fd", str(ready_write)],
                                   pass_fds=[ready_write], start_new_session=True)
        os.close(ready_write)
        ready_write = None
        readable, _, _ = select.select([ready_read], [], [], START_TIMEOUT_S)
        ready = bool(readable) and os.read(ready_read, len(READY)) == READY  # b"": it exited before serving
    finally:
        os.close(ready_read)
        if ready_write is not None:
            os.close(ready_write)
    if not ready:
        _terminate(process)
        raise MetricsServerFailed(f"gateway.metrics_server did not serve port {port} (see the log above)")
    return process
