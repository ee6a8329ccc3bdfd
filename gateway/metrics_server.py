"""`python -m gateway.metrics_server`: the merged /metrics on GATEWAY_METRICS_PORT, from a process of its own.

gunicorn's master starts, restarts and stops it when GATEWAY_METRICS_PORT is set (gateway/metrics_process.py).
On the API port a scrape waits for a worker thread like any request: when Triton hangs, every thread can be
waiting on it, the scrape misses Prometheus's timeout and the monitoring goes blind when it is needed most.
This process shares no thread with the requests. It reads the same multiprocess files and exemplars as the
API port's /metrics and fetches Triton's page itself, so both answer the same page.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from gateway.exemplars import ExemplarStore
from gateway.exposition import Exposition
from gateway.log_format import formatter
from gateway.metrics_process import READY
from gateway.settings import Settings, env_name

PATH = "/metrics"
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"  # no request here to name
PARENT_CHECK_S = 1.0  # how soon an orphan (gunicorn's master killed outright) notices and exits

log = logging.getLogger("gateway.metrics_server")


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the exit


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - one line per scrape would drown the gateway's log
        pass


def metrics_app(exposition: Exposition):
    """WSGI: GET /metrics answers as the API port's does (Accept, `name[]`); anything else is a 404."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "GET":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [f"only GET {PATH} is served on this port\n".encode()]
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        body, content_type = exposition.render(environ.get("HTTP_ACCEPT"), names)
        data = body.encode("utf-8")
        start_response("200 OK", [("Content-Type", content_type), ("Content-Length", str(len(data)))])
        return [data]

    return app


def build_server(settings: Settings) -> WSGIServer:
    """The server bound to (host, metrics_port), reading the workers' files in PROMETHEUS_MULTIPROC_DIR."""
    if not settings.prometheus_multiproc_dir:
        raise ValueError(f"{env_name('prometheus_multiproc_dir')} is not set: there are no workers' metrics to serve")
    exposition = Exposition(settings, None, ExemplarStore(settings.prometheus_multiproc_dir))
    host = settings.host.strip("[]")  # gunicorn's "[::]" form of an IPv6 address
    server_class = _ThreadingWSGIServerV6 if ":" in host else _ThreadingWSGIServer
    return make_server(host, settings.metrics_port, metrics_app(exposition), server_class, _QuietHandler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.metrics_server", description=__doc__.splitlines()[0])
    parser.add_argument("--ready-fd", type=int, help="write a line to this file descriptor once the port is bound")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(settings.log_format, TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    parent = os.getppid()
    try:
        server = build_server(settings)
    except (OSError, ValueError) as error:
        log.error("cannot serve metrics on %s:%s: %s", settings.host, settings.metrics_port, error)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True).start()
    log.info("serving %s on %s:%s", PATH, settings.host, settings.metrics_port)
    if args.ready_fd is not None:
        os.write(args.ready_fd, READY)
        os.close(args.ready_fd)
    while not stop.wait(PARENT_CHECK_S) and os.getppid() == parent:
        pass
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
