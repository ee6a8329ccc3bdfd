"""`python -m gateway.serve` (what `make run` runs): the embedded tritonserver plus gunicorn, stopped together."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

from gateway.settings import ENV_PREFIX, Settings, env_name, triton_metrics_url_for

GUNICORN_CONF = Path(__file__).with_name("gunicorn.conf.py")
START_TIMEOUT_S = 60.0


def parse_args(argv: Sequence[str] | None, defaults: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gateway.serve", description=__doc__)
    parser.add_argument("--host", default=defaults.host, help=f"gateway address (default {defaults.host})")
    parser.add_argument("--port", type=int, default=defaults.port,
                        help=f"gateway port, 0 picks a free one (default {defaults.port})")
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--triton-url", help="gRPC host:port of a running Triton to use instead of starting one "
                                             "(default: GATEWAY_TRITON_URL when it is set)")
    parser.add_argument("--triton-grpc-port", type=int, default=8001, help="embedded Triton's gRPC port (0: free)")
    parser.add_argument("--triton-http-port", type=int, default=8000, help="embedded Triton's HTTP port (0: free)")
    parser.add_argument("--triton-metrics-port", type=int, default=8002,
                        help="embedded Triton's metrics port (0: free)")
    parser.add_argument("--model-repository", type=Path, help="default: the project's model_repository/")
    parser.add_argument("--triton-log-file", type=Path, help="default: a temporary file, printed at start")
    return parser.parse_args(argv)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` nothing listens on right now (the kernel's pick)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def triton_trace_url(settings: Settings) -> str | None:
    """Where the embedded Triton sends its spans: the gateway's OTLP/HTTP collector, as host:port/path.

    None when the gateway exports no spans, or exports them by gRPC (Triton 2.51 speaks OTLP/HTTP only).
    """
    if not settings.traces_exported or settings.otlp_protocol != "http/protobuf":
        return None
    from gateway.tracing import otlp_traces_url

    return otlp_traces_url(settings).split("://", 1)[-1]


def _start_triton(args: argparse.Namespace, settings: Settings):
    """The launcher's TritonServer, started and ready (imported here: `--triton-url` needs none of it).

    With an OTLP endpoint configured, Triton traces to the same collector with rate=0: it traces only the
    requests the gateway sampled (those carry a traceparent), so the gateway's sampler decides for both.
    """
    from ensemble.triton.launcher import CANONICAL_REPOSITORY, TraceSettings, TritonServer

    trace_url = triton_trace_url(settings)
    server = TritonServer(args.model_repository or CANONICAL_REPOSITORY, http_port=args.triton_http_port,
                          grpc_port=args.triton_grpc_port, metrics_port=args.triton_metrics_port,
                          log_file=args.triton_log_file,
                          trace=TraceSettings(trace_url, rate=0) if trace_url else None)
    server.start()
    return server


def gunicorn_command() -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "gateway:create_app()"]


def gateway_environment(settings: Settings) -> dict[str, str]:
    """This process's environment with every GATEWAY_* field of `settings` written over it (the workers read
    them back). The OTEL_* and PROMETHEUS_* fields are left as they are: their own libraries read them too."""
    env = dict(os.environ)
    for field in fields(Settings):
        name = env_name(field.name)
        if name.startswith(ENV_PREFIX):
            env[name] = str(getattr(settings, field.name))
    return env


def _wait_for_gateway(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"the gateway did not answer {url}/healthz within {timeout_s:.0f} s")


def _stop_gunicorn(process: subprocess.Popen, grace_s: float) -> int:
    """SIGTERM (gunicorn finishes in-flight requests), SIGKILL if it overstays its graceful timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Start Triton (unless --triton-url or GATEWAY_TRITON_URL names one), then gunicorn; serve until Ctrl-C /
    SIGTERM, then stop both cleanly."""
    defaults = Settings.from_env()
    args = parse_args(argv, defaults)
    if args.triton_url is None and "triton_url" in Settings.set_in():
        args.triton_url = defaults.triton_url  # the caller named a Triton: use it, start none
    from ensemble.triton.launcher import (interrupting_signals, require_free_port, stop_requested_by_signals,
                                          with_parent_death_signal)

    triton = None
    gunicorn = None
    try:
        with interrupting_signals():  # until both serve, Ctrl-C stops the start-up at once
            port = args.port or free_port(args.host)
            require_free_port(args.host, port, "gateway")  # before Triton's minute of start-up, not after it
            if args.triton_url:
                triton_url, triton_metrics_url = args.triton_url, triton_metrics_url_for(args.triton_url)
            else:
                print("starting tritonserver (CPU) ...", flush=True)
                triton = _start_triton(args, defaults)
                triton_url, triton_metrics_url = triton.grpc_url, triton.metrics_url
                print(f"tritonserver ready in {triton.startup_s:.1f} s (log: {triton.log_path})", flush=True)
            if "triton_metrics_url" in Settings.set_in():  # the caller's choice ("off", or a proxy) stands
                triton_metrics_url = defaults.triton_metrics_url
            settings = replace(defaults, host=args.host, port=port, workers=args.workers, threads=args.threads,
                               triton_url=triton_url, triton_metrics_url=triton_metrics_url)
            # Its own session: Ctrl-C reaches only us, and we stop gunicorn gracefully with SIGTERM. Should we be
            # killed outright, the kernel sends it SIGTERM (as the launcher does for Triton): nothing is left serving.
            gunicorn = subprocess.Popen(with_parent_death_signal(gunicorn_command()),
                                        env=gateway_environment(settings), start_new_session=True)
            base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{port}"
            _wait_for_gateway(base, gunicorn, START_TIMEOUT_S)
        stop_requested = stop_requested_by_signals()
        print(f"\ngateway ready ({settings.workers} workers x {settings.threads} threads)\n"
              f"  web page  {base}/\n  API       POST {base}/v1/detect   (OpenAPI: {base}/openapi.json)\n"
              f"  metrics   {base}/metrics" + (f"  and port {settings.metrics_port} (own process)"
                                                 if settings.metrics_port else "") +
              f"\n  health    {base}/healthz  {base}/readyz\n"
              f"  triton    grpc {triton_url}" + (f"  metrics {triton.metrics_url}" if triton else "") +
              "\nCtrl-C stops both.", flush=True)
        while not stop_requested.wait(0.5):
            if gunicorn.poll() is not None:
                print(f"error: gunicorn exited with code {gunicorn.returncode}", file=sys.stderr)
                return 1
            if triton is not None and not triton.running:
                print(f"error: {triton.exit_report()}", file=sys.stderr)
                return 1
        print("stopping ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted while starting; stopping ...", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # TritonStartError, gunicorn not coming up: say why, exit non-zero
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        if gunicorn is not None:
            code = _stop_gunicorn(gunicorn, defaults.graceful_timeout_s + 10)
            print(f"gateway stopped (exit code {code})", flush=True)
        if triton is not None:
            print(f"tritonserver stopped (exit code {triton.stop()})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
