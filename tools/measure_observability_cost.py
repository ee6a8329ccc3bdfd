"""Side-by-side costs of two observability switches, on this machine, with the real servers:

  summaries  Triton with `--metrics-config summary_latencies=true` vs without: inference latency and
             throughput straight to Triton over gRPC, and the size and fetch time of its metrics page.
  tracing    the gateway (gunicorn, 2 workers) without an OTLP exporter vs exporting every request
             (parentbased_traceidratio 1.0) with Triton tracing at rate=0 into a local OTLP receiver:
             end-to-end latency of /v1/detect.

    .venv/bin/python tools/measure_observability_cost.py [summaries|tracing|all] [--requests N] [--rounds R]

Runs alternate (A B, B A, ...) so that drift on a shared machine hits both sides; the figures are medians over
the rounds. Besides latency, each run reports the CPU time per request of each server's process group (from
/proc), which other load on the machine disturbs far less than latency. Nothing is written; the report goes
to stdout (docs/observability.md quotes it).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import matplotlib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "observability_tests"))  # the test OTLP receiver

from ensemble.triton.launcher import CANONICAL_REPOSITORY, TraceSettings, TritonServer  # noqa: E402
from gateway.serve import free_port  # noqa: E402

HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group (a server and the
    children it started: Triton's Python-backend stubs, gunicorn's workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 (pgrp), counted after the ")" of the command name
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def server_pgid(flag: str) -> int:
    """The process group of the process whose command line holds `flag` (e.g. tritonserver's --grpc-port=N)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if flag.encode() in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    return os.getpgid(int(entry))
            except OSError:
                continue
    raise LookupError(flag)


def _summary(latencies_ms: list[float], wall_s: float) -> dict:
    ordered = sorted(latencies_ms)
    pick = lambda p: ordered[max(0, int(round(p / 100 * len(ordered))) - 1)]  # noqa: E731
    return {"mean": statistics.fmean(ordered), "p50": pick(50), "p95": pick(95), "rps": len(ordered) / wall_s}


def _load(call, requests: int, concurrency: int, pgids: dict[str, int] | None = None) -> dict:
    """Latency and throughput of `requests` calls, plus CPU milliseconds per call of each named process group."""
    for _ in range(5):
        call()  # warm-up
    cpu_before = {name: group_cpu_s(pgid) for name, pgid in (pgids or {}).items()}
    latencies = []
    lock = threading.Lock()

    def one(_):
        start = time.perf_counter()
        call()
        with lock:
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    result = _summary(latencies, time.perf_counter() - start)
    for name, pgid in (pgids or {}).items():
        result[f"{name}_cpu_ms"] = (group_cpu_s(pgid) - cpu_before[name]) * 1000 / requests
    return result


# ------------------------------------------------------------------ Triton summaries
def summaries_run(enabled: bool, requests: int) -> dict:
    import tritonclient.grpc as grpcclient

    image = cv2.imread(str(HOPPER))[np.newaxis]
    extra = ["--metrics-config", "summary_latencies=true"] if enabled else []
    with TritonServer(CANONICAL_REPOSITORY, extra_args=extra) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)

        def infer():
            tensor = grpcclient.InferInput("IMAGE", list(image.shape), "UINT8")
            tensor.set_data_from_numpy(image)
            client.infer("mask_detection", [tensor])

        pgids = {"triton": server_pgid(f"--grpc-port={server.ports['grpc']}")}
        result = _load(infer, requests, concurrency=2, pgids=pgids)
        fetches, size = [], 0
        for _ in range(20):
            start = time.perf_counter()
            with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
                size = len(response.read())
            fetches.append((time.perf_counter() - start) * 1000)
        result.update(metrics_bytes=size, metrics_fetch_ms=statistics.median(fetches))
        client.close()
    return result


# ------------------------------------------------------------------ gateway tracing
def tracing_run(enabled: bool, requests: int) -> dict:
    import requests as http
    from otlp_receiver import OtlpReceiver

    jpeg = HOPPER.read_bytes()
    with OtlpReceiver() as receiver:
        trace = TraceSettings(receiver.triton_url, rate=0, bsp_schedule_delay_ms=200) if enabled else None
        with TritonServer(CANONICAL_REPOSITORY, trace=trace) as triton:
            port = free_port()
            env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
            env.update(GATEWAY_PORT=str(port), GATEWAY_WORKERS="2", GATEWAY_TRITON_URL=triton.grpc_url,
                       GATEWAY_TRITON_METRICS_URL=triton.metrics_url, GATEWAY_ACCESS_LOG="off",
                       GATEWAY_LOG_LEVEL="warning")
            if enabled:
                env.update(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.base_url,
                           OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1.0")
            gunicorn = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gateway/gunicorn.conf.py",
                                         "gateway:create_app()"], cwd=REPO, env=env, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if http.get(url + "/readyz", timeout=2).status_code == 200:
                            break
                    except http.ConnectionError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError("gateway did not start")
                    time.sleep(0.2)
                session = http.Session()
                pgids = {"gateway": os.getpgid(gunicorn.pid),
                         "triton": server_pgid(f"--grpc-port={triton.ports['grpc']}")}
                result = _load(lambda: session.post(url + "/v1/detect", data=jpeg,
                                                    headers={"Content-Type": "image/jpeg"}).raise_for_status(),
                               requests, concurrency=2, pgids=pgids)
                scrapes = []
                for _ in range(20):
                    start = time.perf_counter()
                    session.get(url + "/metrics", headers={"Accept": "application/openmetrics-text"}).raise_for_status()
                    scrapes.append((time.perf_counter() - start) * 1000)
                result["scrape_ms"] = statistics.median(scrapes)  # the merged /metrics, Triton's part included
                time.sleep(1)
                result["spans"] = len(receiver.snapshot())
            finally:
                gunicorn.send_signal(signal.SIGTERM)
                gunicorn.wait(30)
    return result


def compare(name: str, run, requests: int, rounds: int) -> None:
    results = {False: [], True: []}
    for index in range(rounds):
        for enabled in ((False, True) if index % 2 == 0 else (True, False)):  # A B, B A, ...: drift hits both
            results[enabled].append(run(enabled, requests))
            print(f"  round {index + 1} {'on ' if enabled else 'off'} " + "  ".join(
                f"{key}={value:.2f}" for key, value in results[enabled][-1].items()), flush=True)
    print(f"\n{name}: {rounds} rounds x {requests} requests per side (medians over rounds)")
    keys = list(results[False][0])
    print(f"{'':>6}" + "".join(f"{key:>18}" for key in keys))
    for enabled in (False, True):
        row = [statistics.median(r[key] for r in results[enabled]) for key in keys]
        print(f"{'on' if enabled else 'off':>6}" + "".join(f"{value:>18.2f}" for value in row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", default="all", choices=["summaries", "tracing", "all"])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.chdir(REPO)
    if args.what in ("summaries", "all"):
        compare("Triton --metrics-config summary_latencies", summaries_run, args.requests, args.rounds)
    if args.what in ("tracing", "all"):
        compare("gateway + Triton tracing (every request sampled and exported)", tracing_run, args.requests,
                args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
