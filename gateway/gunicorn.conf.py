"""gunicorn settings for `gunicorn -c gateway/gunicorn.conf.py 'gateway:create_app()'`, all taken from Settings.

Per-process state (the Triton gRPC channel, the TracerProvider, the Prometheus registry) is created in
each worker after fork: the app is not preloaded, and post_fork builds the worker's Triton client.
"""
import os
import shutil
import tempfile

from gateway.log_format import gunicorn_logconfig
from gateway.settings import Settings

_settings = Settings.from_env()

# Prometheus multiprocess mode: every worker writes its samples to files here; /metrics merges them.
# prometheus_client reads the variable when it is first imported, so it is set before any worker starts.
# A directory made here holds a marker naming this master's pid: it is this master's to remove at exit, also after
# a HUP has re-read this file (the variable below is set by then). One marked by another master, inherited through
# a binary upgrade (USR2), is that master's: this one makes its own.
OWNED_MARKER = ".made-by-gunicorn-master"


def _made_by(directory: str) -> int | None:
    """The pid of the master that made `directory`, or None for a directory the caller gave."""
    try:
        with open(os.path.join(directory, OWNED_MARKER)) as marker:
            return int(marker.read())
    except (OSError, ValueError):
        return None


def _mark_as_made_here(directory: str) -> None:
    """Name this process in `directory`'s marker: the master that removes it at exit."""
    with open(os.path.join(directory, OWNED_MARKER), "w") as marker:
        marker.write(str(os.getpid()))


_loaded_by = os.getpid()  # under --daemon, not the master: gunicorn forks it off after reading this file
_prometheus_dir = _settings.prometheus_multiproc_dir
if not _prometheus_dir or _made_by(_prometheus_dir) not in (None, os.getpid()):
    _prometheus_dir = tempfile.mkdtemp(prefix="gateway-prometheus-")
    _mark_as_made_here(_prometheus_dir)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _prometheus_dir  # inherited by the workers

bind = [f"{_settings.host}:{_settings.port}"]
workers = _settings.workers
worker_class = "gthread"  # threads wait on Triton concurrently; Triton's dynamic batcher groups their requests
threads = _settings.threads
timeout = _settings.worker_timeout_s
graceful_timeout = _settings.graceful_timeout_s  # SIGTERM: stop accepting, finish in-flight requests, then exit
keepalive = _settings.keepalive_s
preload_app = False  # the app (and everything per-process) is built in each worker, after fork
max_requests = 0  # workers live long: each holds a warm gRPC channel
loglevel = _settings.log_level
# GATEWAY_LOG_FORMAT=json: gunicorn's own lines as JSON too (else its defaults)
logconfig_dict = gunicorn_logconfig(_settings.log_format, _settings.log_level)
# The app writes the access log itself, one JSON line per request with trace ids (gateway/access_log.py,
# GATEWAY_ACCESS_LOG); gunicorn's own text access log would log every request a second time.
accesslog = None
errorlog = "-"
limit_request_line = 8190
proc_name = "facemask-gateway"
# gunicorn >= 27's control socket has one default path per user: parallel gateways (tests) would collide.
control_socket_disable = True


def on_starting(server):
    """Start from an empty metrics directory: files of a previous run would be summed into this one's."""
    from gateway.exemplars import remove_exemplar_files

    os.makedirs(_prometheus_dir, exist_ok=True)
    if _made_by(_prometheus_dir) == _loaded_by != os.getpid():  # daemonized since: the marker names the master now
        _mark_as_made_here(_prometheus_dir)
    for name in os.listdir(_prometheus_dir):
        if name.endswith(".db"):  # prometheus_client's files only, whatever else the directory holds
            os.remove(os.path.join(_prometheus_dir, name))
    remove_exemplar_files(_prometheus_dir)


def when_ready(server):
    """Give every client connection a read timeout, inherited from the listening sockets (gateway/client_timeout.py);
    start the metrics port's own process when GATEWAY_METRICS_PORT asks for one."""
    from gateway.client_timeout import ReadTimeoutLogFilter, set_read_timeout

    for listener in server.LISTENERS:
        set_read_timeout(listener.sock, _settings.client_timeout_s)
    server.log.error_log.addFilter(ReadTimeoutLogFilter(_settings.client_timeout_s))
    if _settings.metrics_port:
        from gateway import metrics_process

        try:
            metrics_process.start(_settings.metrics_port)
        except metrics_process.MetricsServerFailed:
            _remove_owned_prometheus_dir()  # gunicorn exits without on_exit here
            raise


def post_fork(server, worker):
    """Create this worker's TracerProvider and its one Triton client, reused by all its threads."""
    from gateway.tracing import setup_tracing
    from gateway.triton_client import init_worker_detector

    setup_tracing(_settings)
    init_worker_detector(_settings)


def worker_exit(server, worker):
    """Give this worker's shared-memory regions back to Triton and the host before it exits."""
    from gateway.triton_client import close_worker_detectors

    close_worker_detectors()


def child_exit(server, worker):
    """Drop a dead worker's live gauges (and its exemplars) from the merged metrics; free its shared memory."""
    from prometheus_client import multiprocess

    from gateway.exemplars import remove_exemplar_files
    from gateway.shared_memory import remove_region_files

    multiprocess.mark_process_dead(worker.pid)
    remove_exemplar_files(_prometheus_dir, worker.pid)
    remove_region_files(worker.pid)  # a killed worker could not; a clean exit already did


def on_exit(server):
    """Stop the metrics port's process; remove the metrics directory this configuration created."""
    from gateway import metrics_process

    metrics_process.stop()
    _remove_owned_prometheus_dir()


def _remove_owned_prometheus_dir() -> None:
    """The metrics directory this configuration created; one given by the caller is left alone."""
    if _made_by(_prometheus_dir) == os.getpid():
        shutil.rmtree(_prometheus_dir, ignore_errors=True)
