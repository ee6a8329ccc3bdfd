"""Helpers shared by the gateway and observability tests: a real tritonserver + real gunicorn gateway on
loopback (GatewayStack, Gunicorn), encoders, EXIF and bomb fixtures, box comparison.

tests/observability_tests/conftest.py puts this folder on sys.path and imports from here.
"""
from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import time
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import cv2
import numpy as np
import requests
from flask.testing import FlaskClient
from openapi_schema_validator import OAS31Validator
from prometheus_client.parser import text_string_to_metric_families

from ensemble.ssd import pairwise_iou
from ensemble.triton.launcher import TraceSettings, TritonServer, with_parent_death_signal
from gateway.serve import free_port, gunicorn_command  # free_port: the tests import it from here

EXIF_ORIENTATION_TAG = 0x0112
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60
# Variables of the test process that would leak into a gateway under test and change what it does.
INHERITED_OBSERVABILITY_VARIABLES = ("PROMETHEUS_MULTIPROC_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT",
                                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                                     "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_SERVICE_NAME",
                                     "GATEWAY_ACCESS_LOG", "GATEWAY_TRITON_METRICS_URL", "GATEWAY_METRICS_PORT")


class ServerLikeClient(FlaskClient):
    """Flask's test client, but each response is read and closed before it is returned, as a WSGI server does:
    the gateway records a request's metrics and access-log line when its response is closed."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def server_like_client(app) -> ServerLikeClient:
    return ServerLikeClient(app, app.response_class)  # for this client only: app.test_client() stays Flask's


def encode(image_bgr: np.ndarray, ext: str = ".png") -> bytes:
    ok, encoded = cv2.imencode(ext, image_bgr)
    assert ok
    return encoded.tobytes()


def jpeg_with_orientation(stored_bgr: np.ndarray, orientation: int) -> bytes:
    """A JPEG of `stored_bgr` whose EXIF Orientation tag tells viewers to rotate it for display."""
    from PIL import Image

    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(cv2.cvtColor(stored_bgr, cv2.COLOR_BGR2RGB)).save(buffer, "JPEG", quality=95,
                                                                       exif=exif.tobytes())
    return buffer.getvalue()


def png_bomb_header(width: int, height: int) -> bytes:
    """A few dozen bytes: PNG signature, an IHDR claiming width x height, and a tiny IDAT."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def corrupted(images: Sequence[bytes], count: int, seed: int = 0) -> Iterator[tuple[str, int, bytes]]:
    """(how, index of the image it came from, bytes): real encoded images with random bytes overwritten (anywhere,
    or in the header), cut short, or spliced onto the tail of another, as a flaky link or a broken encoder would."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        index = int(rng.integers(len(images)))
        data = bytearray(images[index])
        how = ("anywhere", "header", "cut", "spliced")[rng.integers(4)]
        if how in ("anywhere", "header"):
            span = len(data) if how == "anywhere" else min(len(data), 600)
            for _ in range(int(rng.integers(1, 20))):
                data[rng.integers(span)] = rng.integers(256)
        elif how == "cut":
            data = data[:rng.integers(1, len(data))]
        else:
            other = images[rng.integers(len(images))]
            data = data[:rng.integers(len(data))] + other[rng.integers(len(other)):]
        yield how, index, bytes(data)


def matched_iou(boxes: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """IoU of each expected box with the box at the same rank (both lists are sorted best first)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    expected = np.asarray(expected, dtype=np.float32).reshape(-1, 4)
    assert len(boxes) == len(expected), (boxes, expected)
    return np.diag(pairwise_iou(boxes, expected)) if len(boxes) else np.ones(0)


MIN_IOU = 0.99  # gateway answers vs the in-process reference: the same boxes, up to JPEG and rounding


def assert_matches_reference(body, expected, image_shape):
    """A gateway answer (one image) equals the reference pipeline's detections for the same pixels."""
    assert body["image"] == {"width": image_shape[1], "height": image_shape[0]}
    boxes = [d["box"] for d in body["detections"]]
    assert [d["label"] for d in body["detections"]] == list(expected.labels)
    assert matched_iou(boxes, expected.boxes).min(initial=1.0) >= MIN_IOU
    np.testing.assert_allclose([d["score"] for d in body["detections"]], expected.scores, atol=2e-3)
    np.testing.assert_allclose([d["label_score"] for d in body["detections"]], expected.label_scores, atol=2e-3)


def json_shape(value):
    """The JSON type skeleton of a value: dict keys and value types, the first element of lists."""
    if isinstance(value, dict):
        return {key: json_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


def schema_validator(document, name):
    """A validator for the OpenAPI document's component schema `name`."""
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": document["components"]})


def documented_examples(document, path, status, media="application/json"):
    """The example bodies the OpenAPI document gives for `path` answering `status`."""
    response = document["paths"][path]["post" if path.startswith("/v1") else "get"]["responses"][status]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return [example["value"] for example in response["content"][media]["examples"].values()]


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus text page, by (sample name, sorted label pairs)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scraped(url: str) -> dict[tuple[str, tuple], float]:
    """metric_samples of the page at `url` (a gateway's /metrics, or its metrics port's)."""
    return metric_samples(requests.get(url, timeout=10).text)


def sample_sum(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (over workers, other labels)."""
    wanted = set(labels.items())
    return sum(value for (sample, pairs), value in samples.items() if sample == name and wanted <= set(pairs))


def pgrep(*arguments: str) -> list[int]:
    """The pids `pgrep` finds (`-P PID`: its children; `-x NAME`: processes so named; `-f TEXT`: command lines
    holding TEXT, a regular expression)."""
    found = subprocess.run(["pgrep", *arguments], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def children(pid: int) -> list[int]:
    """The processes `pid` started (a gunicorn master's workers)."""
    return pgrep("-P", str(pid))


# ---------------------------------------------------------------------------------------------------------
# Real servers
def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports nothing listens on right now: each held open until all are picked."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


class Gunicorn:
    """One `gunicorn -c gateway/gunicorn.conf.py 'gateway:create_app()'` subprocess, its output in `log_path`."""

    def __init__(self, env: Mapping[str, str], log_path: Path):
        self.env = dict(env)
        self.port = int(self.env["GATEWAY_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self, ready_path: str = "/readyz") -> "Gunicorn":
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(with_parent_death_signal(gunicorn_command()),  # a killed test run leaves
                                        cwd=REPO_ROOT, env=self.env, stdout=self._log,      # no gateway
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"gunicorn exited; see {self.log_path}"
            try:
                if requests.get(self.url + ready_path, timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gateway not ready within {START_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGTERM (graceful), SIGKILL to the whole group if it overstays."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            code = self.process.wait()
        self._log.close()
        self.process = None
        return code

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


class GatewayStack:
    """tritonserver + gunicorn gateway(s) as subprocesses; Triton can be stopped and restarted.

    `gateway_env` is written over the gateway's environment (OTEL_*, GATEWAY_*); `triton_trace` starts Triton
    with OpenTelemetry tracing, `triton_args` adds tritonserver flags; `metrics_port` gives the gateway a
    metrics port of its own (GATEWAY_METRICS_PORT, then `self.metrics_port`).
    """

    def __init__(self, model_repository: Path, log_dir: Path, *, workers: int = 2,
                 gateway_env: Mapping[str, str] | None = None, triton_trace: TraceSettings | None = None,
                 triton_args: Sequence[str] = (), metrics_port: bool = False):
        self.model_repository = model_repository
        self.log_dir = log_dir
        self.workers = workers
        self.gateway_env = dict(gateway_env or {})
        self.triton_trace = triton_trace
        self.triton_args = list(triton_args)
        self.wants_metrics_port = metrics_port
        self.triton: TritonServer | None = None
        self.gateway: Gunicorn | None = None
        # Picked by start_gateway, just before gunicorn binds them: picked earlier, Triton's own kernel-picked
        # ports could take them in between.
        self.port: int | None = None
        self.metrics_port: int | None = None  # GATEWAY_METRICS_PORT, when asked for

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- Triton ---
    def start_triton(self, same_ports_as: TritonServer | None = None) -> None:
        ports = {} if same_ports_as is None else {f"{name}_port": port for name, port in same_ports_as.ports.items()}
        self.triton = TritonServer(self.model_repository, log_file=self.log_dir / "tritonserver.log",
                                   trace=self.triton_trace, extra_args=self.triton_args, **ports)
        self.triton.start()

    def stop_triton(self) -> TritonServer:
        stopped, self.triton = self.triton, None
        stopped.stop()
        return stopped

    # --- gateway ---
    def environment(self, port: int | None = None, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in INHERITED_OBSERVABILITY_VARIABLES}
        env.update({
            "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port or self.port), "GATEWAY_WORKERS": str(self.workers),
            "GATEWAY_THREADS": "4", "GATEWAY_TRITON_URL": self.triton.grpc_url,
            "GATEWAY_TRITON_METRICS_URL": self.triton.metrics_url, "GATEWAY_RETRY_AFTER_S": "3",
            "GATEWAY_TRITON_RECONNECT_BACKOFF_MS": "500", "GATEWAY_LOG_LEVEL": "info",
        })
        env.update(self.gateway_env)
        if port not in (None, self.port):  # another gateway beside the stack's own: its metrics port is taken
            env.pop("GATEWAY_METRICS_PORT", None)
        elif self.metrics_port is not None:
            env["GATEWAY_METRICS_PORT"] = str(self.metrics_port)
        env.update(overrides or {})
        return env

    def start_gateway(self) -> None:
        """gunicorn on ports picked now, with Triton's already bound (a restart keeps the first ones)."""
        if self.port is None:
            self.port, self.metrics_port = free_ports(2) if self.wants_metrics_port else (free_port(), None)
        self.gateway = Gunicorn(self.environment(), self.log_dir / "gunicorn.log").start()

    def start_another_gateway(self, name: str, overrides: Mapping[str, str] | None = None) -> Gunicorn:
        """A second gateway on the same Triton (own port and log), e.g. with another sampler; the caller stops it."""
        return Gunicorn(self.environment(free_port(), overrides), self.log_dir / f"{name}.log").start()

    @property
    def gunicorn(self) -> subprocess.Popen | None:
        return self.gateway.process if self.gateway is not None else None

    def stop_gateway(self) -> int | None:
        return self.gateway.stop() if self.gateway is not None else None

    def gateway_log(self) -> str:
        return (self.log_dir / "gunicorn.log").read_text(errors="replace")

    def stop(self) -> None:
        self.stop_gateway()
        if self.triton is not None:
            self.stop_triton()

    @contextmanager
    def running(self) -> Iterator[GatewayStack]:
        """Triton, then the gateway; both stopped however the block ends."""
        self.start_triton()
        try:
            self.start_gateway()
            yield self
        finally:
            self.stop()


class FakeDetector:
    """Triton's stand-in only to raise what no real Triton call raises (a KeyError inside the call, say)."""

    def __init__(self, fail_with: Exception):
        self.fail_with = fail_with

    def detect(self, image, parameters=None):
        raise self.fail_with
