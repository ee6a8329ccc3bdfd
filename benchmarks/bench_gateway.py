"""HTTP load on the gateway (gunicorn + Flask in front of Triton) with wrk, over the benchmark image set.

Starts the embedded tritonserver (unless one is handed in) and the real gateway (`gunicorn -c
gateway/gunicorn.conf.py 'gateway:create_app()'`, the command `make run` starts, on a free loopback
port), JPEG-encodes the image set (benchmarks/image_set.py, quality 95 by default: what a camera or a
browser uploads), and sweeps the concurrency with wrk: one keep-alive connection per concurrent client,
each POSTing the bodies to /v1/detect in turn (benchmarks/wrk_bodies.lua). Per level: throughput of
2xx answers, p50/p90/p95/p99 and every error (non-2xx, connect/read/write errors, timeouts), plus
Triton's server-side statistics for the same window.

    python -m benchmarks.bench_gateway                     # levels 1,2,3,4,6, 6 s each
    python -m benchmarks.bench_gateway --concurrency 1,4 --duration 3 --workers 1 --threads 8

Why wrk and not a Python client: on a 2-core machine the load generator shares the cores with Triton
and gunicorn, and wrk (C, epoll, one thread, requests pre-formatted in Lua) spends a few microseconds of
CPU per request where an asyncio client spends about a millisecond; and like perf_analyzer's
concurrency mode it is a closed loop (N connections, each sends its next request when the previous
answer arrives), so the two sweeps compare like with like.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from benchmarks.common import machine_info, machine_line, results_dir, write_json
from benchmarks.cpu import CpuMeter, session_pids, triton_session
from benchmarks.image_set import benchmark_images, describe
from benchmarks.model_inputs import ENSEMBLE
from benchmarks.triton_stats import model_stats, stats_delta
from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.launcher import TritonServer, TritonStartError, with_parent_death_signal

SCHEMA = "facemask.bench.gateway/1"
LUA_SCRIPT = Path(__file__).with_name("wrk_bodies.lua")
WRK_ENV = "WRK"  # path of a wrk binary to use instead of the one on PATH
RESULT_MARK = "WRK_RESULT "
LEVEL_OVERHEAD_S = 1.0  # wrk start-up, Triton statistics before/after
START_TIMEOUT_S = 60.0
ENDPOINT = "/v1/detect"
MIN_DURATION_S = 1
DIRECT_REGION_PREFIX = "facemask-bench-direct-"  # the paired direct client's shared-memory region (and /dev/shm key)
DIRECT_TIMEOUT_S = 30.0  # a wedged Triton fails the paired measurement instead of hanging the run


class GatewayBenchError(RuntimeError):
    """The gateway could not be started or wrk could not be run; the message says why."""


@dataclass(frozen=True)
class Settings:
    """How each level is measured, and the gateway's process layout (gunicorn workers x threads)."""

    duration_s: int = 6  # measured seconds per level (wrk takes whole seconds)
    warmup_s: int = 2  # one unmeasured wrk run before the sweep
    timeout_s: int = 10  # wrk counts a request as a timeout error after this
    wrk_threads: int = 1
    jpeg_quality: int = 95
    paired_passes: int = 10  # passes over the image set for the paired c=1 breakdown (10 frames each)
    workers: int | None = None  # None: the gateway's own default (gateway/settings.py)
    threads: int | None = None
    shared_memory: str | None = None  # GATEWAY_TRITON_SHARED_MEMORY ("system" / "off"); None: the gateway's default


def find_wrk() -> str:
    binary = os.environ.get(WRK_ENV) or shutil.which("wrk")
    if not binary:
        raise GatewayBenchError("wrk is not installed: `make system-deps` (or apt-get install wrk) installs "
                                "Debian's wrk, or set WRK=/path/to/wrk")
    return binary


def wrk_version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return ((result.stdout or result.stderr).splitlines() or ["unknown"])[0].split(" Copyright")[0].strip()


def encode_bodies(images: dict[str, np.ndarray], directory: Path, quality: int) -> list[dict]:
    """Write each frame as a JPEG file (what clients upload); the list file wrk reads goes beside them."""
    directory.mkdir(parents=True, exist_ok=True)
    bodies = []
    for index, (name, image) in enumerate(images.items()):
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise GatewayBenchError(f"could not JPEG-encode {name}")
        path = directory / f"{index:02d}.jpg"
        path.write_bytes(encoded.tobytes())
        bodies.append({"name": name, "path": str(path.resolve()), "bytes": path.stat().st_size,
                       "width": image.shape[1], "height": image.shape[0]})
    (directory / "bodies.txt").write_text("".join(body["path"] + "\n" for body in bodies))
    return bodies


def describe_bodies(bodies: list[dict], quality: int) -> dict:
    digest = hashlib.sha256()
    for body in bodies:
        digest.update(Path(body["path"]).read_bytes())
    sizes = [body["bytes"] for body in bodies]
    return {"format": "image/jpeg", "jpeg_quality": quality, "count": len(bodies),
            "mean_bytes": round(sum(sizes) / len(sizes)), "sha256": digest.hexdigest()}


class Gateway:
    """`gunicorn gateway:create_app()` against Triton's gRPC URL on a free loopback port; a context manager.

    The command and environment are the ones `python -m gateway.serve` (make run) uses; the OTLP
    exporter and any inherited Prometheus directory are left out so a run measures the same thing
    on every machine.
    """

    def __init__(self, triton_url: str, *, workers: int | None = None, threads: int | None = None,
                 log_file: Path | None = None, triton_metrics_url: str | None = None,
                 shared_memory: str | None = None):
        from dataclasses import fields

        from gateway.serve import free_port
        from gateway.settings import Settings as GatewaySettings

        known = {field.name for field in fields(GatewaySettings)}
        overrides = {"workers": workers, "threads": threads, "triton_metrics_url": triton_metrics_url,
                     "triton_shared_memory": shared_memory}
        self.settings = replace(GatewaySettings.from_env(), host="127.0.0.1", port=free_port(), metrics_port=0,
                                triton_url=triton_url,
                                **{key: value for key, value in overrides.items() if value is not None and key in known})
        self.url = f"http://127.0.0.1:{self.settings.port}"
        self.log_file = log_file
        self.startup_s: float | None = None
        self._process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "Gateway":
        from gateway.serve import gateway_environment, gunicorn_command

        env = gateway_environment(self.settings)
        for name in [name for name in env if name.startswith("OTEL_")] + ["PROMETHEUS_MULTIPROC_DIR"]:
            env.pop(name, None)  # no span export, a fresh metrics directory: the same work on every machine
        began = time.monotonic()
        self._log = open(self.log_file, "wb") if self.log_file else subprocess.DEVNULL
        self._process = subprocess.Popen(with_parent_death_signal(gunicorn_command()), env=env, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.monotonic() - began
        return self

    @property
    def session(self) -> int | None:
        """gunicorn's session id (= the master's pid: it is started in a new session), for CPU accounting."""
        return self._process.pid if self._process is not None else None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise GatewayBenchError(f"gunicorn exited with code {self._process.returncode} before it was ready"
                                        + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                status, _, _ = request(self.url, "GET", "/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise GatewayBenchError(f"the gateway was not ready within {START_TIMEOUT_S:.0f} s")

    def __exit__(self, *exc_info) -> None:
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.settings.graceful_timeout_s + 5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None


def request(base_url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 30, connection: http.client.HTTPConnection | None = None):
    """(status, headers, body) of one request; reuses `connection` (keep-alive) when given."""
    own = connection is None
    if own:
        host, port = base_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if own:
            connection.close()


SERVER_TIMING = re.compile(r"(?P<stage>[\w-]+);dur=(?P<ms>[\d.]+)")


def timing_breakdown(base_url: str, bodies: list[dict], passes: int = 2, images: dict | None = None,
                     grpc_url: str | None = None, shared_memory: bool = False) -> dict:
    """One client, one request at a time: the gateway's Server-Timing stages (decode, inference, total).

    With `images` and `grpc_url`, each gateway request is paired with the same frame sent straight to
    Triton over gRPC (tritonclient, as the gateway calls it, its pixels through a shared-memory region when
    `shared_memory`, as the gateway under test sends them), just before it on even passes and just after
    it on odd ones, so neither half always follows the other: `paired_added_p50_ms` (the median of the
    per-pair differences, with a bootstrap 95% interval) is the gateway's own cost, HTTP + JPEG decode +
    Flask, measured with the least drift and with no transport advantage on either side. Checks every
    answer is a 200 with at least one detection (each frame shows a face), so a broken stack fails before
    the sweep.
    """
    host, port = base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    frames = list(images.values()) if images is not None and grpc_url else []
    direct = _DirectClient(grpc_url, max(frame.nbytes for frame in frames) if shared_memory else 0) if frames else None
    stages: dict[str, list[float]] = {}
    client_ms, direct_ms, faces = [], [], 0
    try:
        payloads = [Path(body["path"]).read_bytes() for body in bodies]
        for number in range(passes):
            direct_first = number % 2 == 0
            for index, body in enumerate(bodies):
                if direct and direct_first:
                    direct_ms.append(direct.infer_ms(frames[index]))
                began = time.perf_counter()
                status, headers, payload = request(base_url, "POST", ENDPOINT, payloads[index],
                                                   {"Content-Type": "image/jpeg", "Accept": "application/json"},
                                                   connection=connection)
                client_ms.append((time.perf_counter() - began) * 1e3)
                if direct and not direct_first:
                    direct_ms.append(direct.infer_ms(frames[index]))
                if status != 200:
                    raise GatewayBenchError(f"{body['name']}: the gateway answered {status}: {payload[:300]!r}")
                found = len(json.loads(payload)["detections"])
                if found == 0:
                    raise GatewayBenchError(f"{body['name']}: the gateway found no face in a frame that shows one")
                faces += found
                header = next((value for key, value in headers.items() if key.lower() == "server-timing"), "")
                for match in SERVER_TIMING.finditer(header):
                    stages.setdefault(match["stage"], []).append(float(match["ms"]))
    finally:
        connection.close()
        if direct:
            direct.close()
    p50 = {stage: round(float(np.median(values)), 2) for stage, values in stages.items()}
    named = [stage for stage in stages if stage != "total"]
    if "total" in stages and all(len(stages[stage]) == len(stages["total"]) for stage in named):
        # total minus every named stage: routing, parsing, JSON, logging, metrics, tracing
        p50["flask_other"] = round(float(np.median(np.array(stages["total"])
                                                   - np.sum([stages[stage] for stage in named], axis=0))), 2)
    p50["client_round_trip"] = round(float(np.median(client_ms)), 2)
    result = {"requests": len(client_ms), "faces_per_image": round(faces / len(client_ms), 3), "p50_ms": p50}
    if direct_ms:
        result["direct_grpc_p50_ms"] = round(float(np.median(direct_ms)), 2)
        result["direct_transport"] = "system" if shared_memory else "off"
        added = np.array(client_ms) - np.array(direct_ms)
        result["paired_added_p50_ms"] = round(float(np.median(added)), 2)
        result["paired_added_p50_ci95_ms"] = [round(bound, 2) for bound in median_interval(added)]
    return result


def median_interval(samples: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap 95% interval for the median: how far the paired estimate could move by chance."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(samples, size=(resamples, len(samples))), axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


class _DirectClient:
    """The same call the gateway makes (tritonclient gRPC, one frame, all outputs), timed from outside.

    `region_bytes` > 0: the pixels go through a system shared-memory region of that size, copied in within the
    timed call as the gateway copies them, so the pairing compares like with like.
    """

    def __init__(self, grpc_url: str, region_bytes: int = 0):
        import tritonclient.grpc as grpcclient

        from gateway.shared_memory import Region

        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(grpc_url)
        self._outputs = [grpcclient.InferRequestedOutput(name)
                         for name in ("BOXES", "SCORES", "LABELS", "LABEL_SCORES", "NUM_DETECTIONS")]
        self._region = None
        if region_bytes:
            self._region = Region(f"{DIRECT_REGION_PREFIX}{os.getpid()}", region_bytes)
            try:
                self._region.register(self._client)
            except BaseException:
                self._region.destroy()
                raise

    def infer_ms(self, frame: np.ndarray) -> float:
        began = time.perf_counter()
        batch = np.ascontiguousarray(frame[np.newaxis])
        tensor = self._grpc.InferInput("IMAGE", list(batch.shape), "UINT8")
        if self._region is None:
            tensor.set_data_from_numpy(batch)
        else:
            self._region.write(batch)
            tensor.set_shared_memory(self._region.name, batch.nbytes)
        self._client.infer(ENSEMBLE, [tensor], outputs=self._outputs, client_timeout=DIRECT_TIMEOUT_S)
        return (time.perf_counter() - began) * 1e3

    def close(self) -> None:
        try:
            if self._region is not None:
                self._client.unregister_system_shared_memory(self._region.name)
        finally:
            if self._region is not None:
                self._region.destroy()
            self._client.close()


def parse_wrk(output: str) -> dict:
    line = next((line for line in output.splitlines() if line.startswith(RESULT_MARK)), None)
    if line is None:
        raise GatewayBenchError(f"wrk printed no result line:\n{output[-1500:]}")
    return json.loads(line[len(RESULT_MARK):])


def run_wrk(binary: str, url: str, body_list: Path, concurrency: int, duration_s: int, settings: Settings,
            log_file: Path | None = None) -> dict:
    threads = max(1, min(settings.wrk_threads, concurrency))
    args = [binary, f"-t{threads}", f"-c{concurrency}", f"-d{duration_s}s", "--timeout", f"{settings.timeout_s}s",
            "-s", str(LUA_SCRIPT), url + ENDPOINT, "--", str(body_list)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=duration_s + settings.timeout_s + 30)
    output = result.stdout + result.stderr
    if log_file is not None:
        with open(log_file, "a") as log:
            log.write(f"$ {' '.join(args)}\n{output}\n")
    if result.returncode != 0:
        raise GatewayBenchError(f"wrk exited with code {result.returncode}:\n{output[-1500:]}")
    return parse_wrk(output)


def level_result(concurrency: int, raw: dict, server_models: dict, cpu_s: dict | None = None) -> dict:
    """One level's figures: 2xx throughput, latency percentiles in ms, every kind of error counted."""
    seconds = raw["duration_us"] / 1e6
    errors = dict(raw["errors"])
    errors["non2xx"] = raw["non2xx"]
    # wrk's own "status" count is responses >= 400, a subset of non-2xx; socket errors and timeouts are not responses.
    failed = raw["non2xx"] + errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    latency = {key: round(value / 1e3, 2) for key, value in raw["latency_us"].items()}
    ok_requests = raw["requests"] - raw["non2xx"]
    cpu = {f"{name}_cpu_ms_per_request": round(seconds_used * 1e3 / raw["requests"], 2)
           for name, seconds_used in (cpu_s or {}).items() if seconds_used is not None and raw["requests"]}
    return {
        "concurrency": concurrency, "ok": ok_requests > 0,
        "requests": raw["requests"], "ok_requests": ok_requests, "duration_s": round(seconds, 3),
        "throughput_rps": round(ok_requests / seconds, 3) if seconds else 0.0,
        "p50_ms": latency["p50"], "p90_ms": latency["p90"], "p95_ms": latency["p95"], "p99_ms": latency["p99"],
        "mean_ms": latency["mean"], "max_ms": latency["max"],
        "errors": errors, "error_count": failed,
        "non2xx_codes": raw.get("non2xx_codes", ""),
        "server_models": server_models,
        **cpu,
    }


TRANSPORT_LABELS = {"system": "shm", "off": "inline"}  # how the pixels reach Triton, as progress lines say it


def gateway_label(transport: str = "") -> str:
    """`gateway[shm]`, `gateway[inline]`: the gateway named in progress lines with how its pixels reach Triton."""
    return f"gateway[{TRANSPORT_LABELS.get(transport, transport)}]" if transport else "gateway"


def level_line(level: dict, transport: str = "") -> str:
    name = gateway_label(transport)
    if not level.get("ok") and "p50_ms" not in level:
        return f"{name} c={level['concurrency']}: no result ({level.get('skipped') or level.get('error')})"
    ensemble = level["server_models"].get(ENSEMBLE, {})
    return (f"{name} c={level['concurrency']}: {level['throughput_rps']:7.1f} req/s  "
            f"p50 {level['p50_ms']:7.1f} ms  p95 {level['p95_ms']:7.1f} ms  p99 {level['p99_ms']:7.1f} ms  "
            f"errors {level['error_count']}  (Triton: {ensemble.get('requests', 0)} requests, "
            f"{ensemble.get('request_us') and ensemble['request_us'] / 1e3 or 0:.1f} ms each)"
            + "".join(f"  {name} cpu {level[f'{name}_cpu_ms_per_request']:.0f} ms/req" for name in ("gateway", "triton")
                      if level.get(f"{name}_cpu_ms_per_request") is not None))


class GatewaySweep:
    """The gateway benchmark in steps, so its levels can be interleaved with perf_analyzer's.

    start(server) -> level(concurrency) ... -> finish() (stops gunicorn, writes <output_dir>/<document_name>).
    The time budget counts this sweep's own steps only (gateway start, checks, warm-up, levels).
    """

    def __init__(self, *, concurrency: Sequence[int] = (1, 2, 3, 4, 6), settings: Settings = Settings(),
                 repository: Path = DEFAULT_REPOSITORY, output_dir: Path | None = None, budget_s: float = 90.0,
                 log=print, document_name: str = "gateway.json"):
        self.concurrency, self.settings, self.budget_s, self.log = list(concurrency), settings, budget_s, log
        self.document_name = document_name
        self.transport = settings.shared_memory or default_transport()
        self.binary = find_wrk()
        self.output_dir = Path(output_dir) if output_dir else results_dir()
        self.workdir = self.output_dir / "gateway"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.images = benchmark_images()
        # The JPEG bodies go to a temporary folder (their sizes and sha256 are recorded in the document).
        self.bodies_dir = Path(tempfile.mkdtemp(prefix="gateway-bodies-"))
        self.bodies = encode_bodies(self.images, self.bodies_dir, settings.jpeg_quality)
        self.body_list = self.bodies_dir / "bodies.txt"
        self.wrk_log = self.workdir / f"wrk-{self.transport}.log"
        self.wrk_log.unlink(missing_ok=True)
        self.spent_s = 0.0
        self.server = self.gateway = None
        self._stack = ExitStack()
        self._meters: dict[str, CpuMeter] = {}
        self.document = {
            "schema": SCHEMA,
            "benchmark": "gateway",
            "description": f"wrk (closed loop, one keep-alive connection per concurrent client) POSTing JPEG "
                           f"bodies to the gateway's {ENDPOINT}",
            "machine": machine_info(),
            "image_set": describe(self.images),
            "bodies": describe_bodies(self.bodies, settings.jpeg_quality),
            "settings": {**asdict(settings), "shared_memory": self.transport, "concurrency": list(concurrency),
                         "budget_s": budget_s,
                         "model_repository": str(repository)},
            "wrk": {"version": wrk_version(self.binary), "binary": self.binary, "script": LUA_SCRIPT.name},
            "levels": [],
        }

    def start(self, server) -> None:
        """gunicorn in front of `server`; every body checked once; wrk warm-up; the paired c=1 breakdown."""
        began = time.monotonic()
        settings = self.settings
        self.server = server
        try:
            self.gateway = gateway = self._stack.enter_context(Gateway(
                server.grpc_url, workers=settings.workers, threads=settings.threads, shared_memory=self.transport,
                log_file=self.workdir / f"gunicorn-{self.transport}.log",
                triton_metrics_url=getattr(server, "metrics_url", None)))
            self.document["gateway"] = {"url": gateway.url, "workers": gateway.settings.workers,
                                        "threads": gateway.settings.threads, "startup_s": round(gateway.startup_s, 2),
                                        "triton_url": server.grpc_url,
                                        "triton_shared_memory": gateway.settings.triton_shared_memory}
            self.log(f"gateway ready in {gateway.startup_s:.1f} s at {gateway.url} "
                     f"({gateway.settings.workers} workers x {gateway.settings.threads} threads, "
                     f"GATEWAY_TRITON_SHARED_MEMORY={self.transport})")
            timing_breakdown(gateway.url, self.bodies, passes=1)  # every body once: checks the answers
            self._check_transport(server.grpc_url, gateway.session)
            if settings.warmup_s:
                # as many connections as the largest level, so every shared-memory region it needs exists first
                run_wrk(self.binary, gateway.url, self.body_list, max(2, 2 * gateway.settings.workers,
                                                                      *self.concurrency),
                        settings.warmup_s, settings, self.wrk_log)
            timing = self.document["server_timing_c1"] = timing_breakdown(
                gateway.url, self.bodies, passes=settings.paired_passes, images=self.images, grpc_url=server.grpc_url,
                shared_memory=self.transport == "system")
            p50 = timing["p50_ms"]
            self.log(f"{self.label} c=1 paired with direct gRPC [{TRANSPORT_LABELS[timing['direct_transport']]}] "
                     f"({timing['requests']} pairs): adds "
                     f"{timing.get('paired_added_p50_ms')} ms p50 (decode {p50.get('decode')} ms, "
                     f"Flask and the rest {p50.get('flask_other')} ms, Triton call {p50.get('inference')} ms "
                     f"vs direct {timing.get('direct_grpc_p50_ms')} ms)")
            self._meters = {"gateway": CpuMeter(gateway.session), "triton": CpuMeter(triton_session(server.grpc_url))}
        except BaseException:
            self._stack.close()
            raise
        finally:
            self.spent_s += time.monotonic() - began

    def _check_transport(self, grpc_url: str, session: int) -> None:
        """The pixels went the way this sweep is labelled: its workers hold Triton shared memory iff "system"."""
        regions = gateway_regions(grpc_url, session_pids(session))
        self.document["gateway"]["shared_memory_regions"] = len(regions)
        if bool(regions) != (self.transport == "system"):
            raise GatewayBenchError(f"the gateway labelled GATEWAY_TRITON_SHARED_MEMORY={self.transport} holds "
                                    f"{len(regions)} shared-memory regions on Triton; see its gunicorn log")

    def level(self, concurrency: int) -> dict:
        began = time.monotonic()
        duration = min(self.settings.duration_s, int(self.budget_s - self.spent_s - LEVEL_OVERHEAD_S))
        if duration < MIN_DURATION_S:
            result = {"concurrency": concurrency, "ok": False, "skipped": "time budget spent"}
        else:
            before = model_stats(self.server.http_url)
            for meter in self._meters.values():
                meter.start()
            try:
                raw = run_wrk(self.binary, self.gateway.url, self.body_list, concurrency, duration, self.settings,
                              self.wrk_log)
                cpu_s = {name: meter.stop() for name, meter in self._meters.items()}
                result = level_result(concurrency, raw, stats_delta(before, model_stats(self.server.http_url)), cpu_s)
            except (GatewayBenchError, subprocess.TimeoutExpired) as exc:
                result = {"concurrency": concurrency, "ok": False, "error": str(exc)[-500:]}
        self.document["levels"].append(result)
        self.log(level_line(result, self.transport))
        self.spent_s += time.monotonic() - began
        return result

    def pending(self) -> list[int]:
        done = {level["concurrency"] for level in self.document["levels"]}
        return [level for level in self.concurrency if level not in done]

    def finish(self) -> dict:
        self._stack.close()
        shutil.rmtree(self.bodies_dir, ignore_errors=True)
        self.document["elapsed_s"] = round(self.spent_s, 1)
        write_json(self.output_dir / self.document_name, self.document)
        return self.document

    @property
    def label(self) -> str:
        return gateway_label(self.transport)


def gateway_regions(grpc_url: str, pids: Sequence[int]) -> list[str]:
    """Names of the system shared-memory regions Triton holds for gateway workers among `pids`."""
    import tritonclient.grpc as grpcclient

    from gateway.shared_memory import registered_regions, worker_prefix

    with grpcclient.InferenceServerClient(grpc_url) as client:
        return sorted(registered_regions(client, tuple(worker_prefix(pid) for pid in pids)))


def default_transport() -> str:
    """The gateway's own GATEWAY_TRITON_SHARED_MEMORY (its default unless the environment says otherwise)."""
    from gateway.settings import Settings as GatewaySettings

    return GatewaySettings.from_env().triton_shared_memory


def run(*, concurrency: Sequence[int] = (1, 2, 3, 4, 6), settings: Settings = Settings(),
        repository: Path = DEFAULT_REPOSITORY, output_dir: Path | None = None, budget_s: float = 90.0,
        server=None, log=print) -> dict:
    """The whole gateway sweep; returns the result document (also written to <output_dir>/gateway.json).

    `server`: a running TritonServer (anything with grpc_url, http_url) to put the gateway in front of;
    by default one is started for the run (its start counts against the budget). Levels that would
    overrun `budget_s` are shortened to at least 1 s, then skipped.
    """
    sweep = GatewaySweep(concurrency=concurrency, settings=settings, repository=repository, output_dir=output_dir,
                         budget_s=budget_s, log=log)
    with ExitStack() as stack:
        if server is None:
            began = time.monotonic()
            server = stack.enter_context(TritonServer(repository, log_file=sweep.workdir / "tritonserver.log"))
            sweep.spent_s += time.monotonic() - began
            log(f"tritonserver ready in {server.startup_s:.1f} s at {server.grpc_url}")
        try:
            sweep.start(server)
            for level in sweep.pending():
                sweep.level(level)
        finally:
            document = sweep.finish()
    return document


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.bench_triton import parse_concurrency

    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 3, 4, 6],
                        help="start:end[:step] or a,b,c (default 1,2,3,4,6)")
    parser.add_argument("--duration", type=int, default=defaults.duration_s, help="seconds per level (default 6)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup_s, help="unmeasured wrk seconds (default 2)")
    parser.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: the gateway's GATEWAY_WORKERS)")
    parser.add_argument("--threads", type=int, help="threads per worker (default: the gateway's GATEWAY_THREADS)")
    parser.add_argument("--shared-memory", choices=("system", "off"),
                        help="how pixels reach Triton (default: the gateway's GATEWAY_TRITON_SHARED_MEMORY)")
    parser.add_argument("--budget-s", type=float, default=90.0, help="wall-clock budget (default 90)")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<timestamp>/")
    args = parser.parse_args(argv)

    settings = replace(defaults, duration_s=args.duration, warmup_s=args.warmup, jpeg_quality=args.jpeg_quality,
                       workers=args.workers, threads=args.threads, shared_memory=args.shared_memory)
    output_dir = args.results_dir or results_dir()
    try:
        document = run(concurrency=args.concurrency, settings=settings, repository=args.model_repository,
                       output_dir=output_dir, budget_s=args.budget_s, log=lambda message: print(message, flush=True))
    except (GatewayBenchError, TritonStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"machine: {machine_line(document['machine'])}; {document['elapsed_s']:.0f} s in all")
    print(f"result: {output_dir / 'gateway.json'}")
    return 0 if any(level.get("ok") for level in document["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
