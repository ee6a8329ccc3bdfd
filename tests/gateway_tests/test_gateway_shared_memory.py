"""Images reach Triton through system shared memory: same answers as inline, regions given back, re-registered
after Triton forgets them, inline where Triton cannot map them, and a killed worker's regions cleaned up.

The live tests use the session gateway stack's tritonserver (one Triton for all gateway tests), real /dev/shm,
real gunicorn and, for the unmappable case, a child process with its own /dev/shm (a private mount namespace).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import cv2
import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from flask import Flask
from gateway_helpers import (INHERITED_OBSERVABILITY_VARIABLES, REPO_ROOT, Gunicorn, children, encode, free_port,
                             scraped)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind

from gateway import shared_memory
from gateway.settings import Settings
from gateway.shared_memory import (MAX_REGION_BYTES, SHM_DIR, region_bytes, registered_regions,
                                   remove_region_files, worker_prefix)
from gateway.tracing import PROVIDER_KEY
from gateway.triton_client import INLINE_REASON_ATTRIBUTE, TRANSPORT_ATTRIBUTE, TritonDetector

live = pytest.mark.triton
IN_FLIGHT = ("gateway_inflight_requests", ())  # the gauge's one series, summed over workers
WORKER_RESPAWN_TIMEOUT_S = 30
INLINE_WARNING = "sends images inside the gRPC request"
SAMPLED_TRACE_ID = "ab" * 16  # a caller's sampled trace: the gateway continues it, and records it as an exemplar

# A gateway process whose /dev/shm Triton cannot see: run under `unshare --mount` with a fresh tmpfs there.
PRIVATE_SHM_CHILD = r"""
import json, logging, os, sys
import numpy as np
from gateway.settings import Settings
from gateway.triton_client import TritonDetector

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
url, image_path = sys.argv[1:3]
image = np.load(image_path)
shm_before = sorted(os.listdir("/dev/shm"))
detector = TritonDetector(Settings(triton_url=url))
try:
    runs = [detector.detect(image) for _ in range(2)]
    print(json.dumps({"shm_before": shm_before, "faces": [len(run.labels) for run in runs],
                      "boxes": [run.boxes.tolist() for run in runs], "labels": [run.labels for run in runs],
                      "available": detector._regions.unavailable is None,
                      "reasons": [run.inline_reason for run in runs]}))
finally:
    detector.close()
"""

# A gateway process that runs out of file descriptors for a moment (RLIMIT_NOFILE lowered to what it has open).
OUT_OF_DESCRIPTORS_CHILD = r"""
import json, os, resource, sys
import numpy as np
from gateway.settings import Settings
from gateway.triton_client import TritonDetector
url, image_path = sys.argv[1:3]
image = np.load(image_path)
detector = TritonDetector(Settings(triton_url=url))
try:
    detector.readiness()  # the gRPC channel's connection exists before the descriptors run out
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
    short = detector.detect(image)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    after = detector.detect(image)
    print(json.dumps({"labels": [short.labels, after.labels], "transports": [short.transport, after.transport],
                      "available": detector._regions.unavailable is None,
                      "reasons": [short.inline_reason, after.inline_reason]}))
finally:
    detector.close()
"""


# ---------------------------------------------------------------------------------------------------------
# helpers
def registered(triton_url: str, prefix: str) -> dict[str, dict]:
    """Triton's system shared-memory regions whose name starts with `prefix` (name -> status)."""
    with grpcclient.InferenceServerClient(triton_url) as client:
        return registered_regions(client, prefix)


def region_files(prefix: str) -> list[str]:
    return sorted(glob.glob(os.path.join(SHM_DIR, prefix + "*")))


@contextmanager
def captured_spans() -> Iterator[InMemorySpanExporter]:
    """Every span the gateway's tracer makes inside the block (an app whose provider samples all of them)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = Flask(__name__)
    app.extensions[PROVIDER_KEY] = provider  # what gateway.tracing._tracer() uses inside an app context
    with app.app_context():
        yield exporter
    provider.shutdown()


def transports(exporter: InMemorySpanExporter) -> list[str]:
    return [span.attributes.get(TRANSPORT_ATTRIBUTE) for span in exporter.get_finished_spans()
            if span.kind == SpanKind.CLIENT]


def inline_reasons(exporter: InMemorySpanExporter) -> list[str | None]:
    return [span.attributes.get(INLINE_REASON_ATTRIBUTE) for span in exporter.get_finished_spans()
            if span.kind == SpanKind.CLIENT]


def assert_same_detections(got, want) -> None:
    assert got.labels == want.labels
    np.testing.assert_allclose(got.boxes, want.boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)


def detect_in_private_shm(triton_url: str, image: np.ndarray, tmp_path, mount_options: str = "rw") -> tuple[dict, str]:
    """Run PRIVATE_SHM_CHILD with a fresh tmpfs at /dev/shm mounted with `mount_options`: (its JSON answer, its
    stderr)."""
    image_path = tmp_path / "image.npy"
    np.save(image_path, image)
    env = {key: value for key, value in os.environ.items() if key not in INHERITED_OBSERVABILITY_VARIABLES}
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'mount -t tmpfs -o {mount_options} tmpfs /dev/shm && exec "$0" "$@"',
         sys.executable, "-c", PRIVATE_SHM_CHILD, triton_url, str(image_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture
def triton_url(gateway_stack) -> str:
    return gateway_stack.triton.grpc_url


@pytest.fixture
def inline_detector(triton_url) -> Iterator[TritonDetector]:
    detector = TritonDetector(Settings(triton_url=triton_url, triton_shared_memory="off"))
    yield detector
    detector.close()


# ---------------------------------------------------------------------------------------------------------
# unit: sizes, settings, the master's clean-up
def test_a_region_holds_the_largest_downscaled_image():
    """Every image the gateway sends after downscaling to max_side fits, with no more memory pinned than that."""
    assert region_bytes(1280, 40_000_000) == 3 * 1280 * 1280
    assert region_bytes(1280, 1000) == 3 * 1000  # a pixel cap below max_side^2 is what bounds it
    assert region_bytes(0, 1000) == 3 * 1000  # no downscaling: bounded by max_pixels ...
    assert region_bytes(0, 40_000_000) == MAX_REGION_BYTES  # ... and by the cap on one region


def test_shared_memory_setting_defaults_to_system_and_rejects_unknown_values():
    """A typo must fail at start-up, naming the variable, not silently send inline."""
    assert Settings().triton_shared_memory == "system"
    assert Settings.from_env({}).triton_shared_memory == "system"
    assert Settings.from_env({"GATEWAY_TRITON_SHARED_MEMORY": "off"}).triton_shared_memory == "off"
    with pytest.raises(ValueError, match="GATEWAY_TRITON_SHARED_MEMORY"):
        Settings.from_env({"GATEWAY_TRITON_SHARED_MEMORY": "bogus"})


def test_removing_a_dead_workers_files_leaves_other_workers_alone():
    """child_exit frees only the dead pid's regions, even where another pid starts with the same digits."""
    dead, alive = 900000001, 9000000012  # beyond any pid_max: never a real process
    handles = [shm.create_shared_memory_region(name, "/" + name, 64, create_only=True)
               for name in (f"{worker_prefix(dead)}test-0", f"{worker_prefix(dead)}test-1",
                            f"{worker_prefix(alive)}test-0")]
    try:
        assert len(region_files(worker_prefix(dead))) == 2 and len(region_files(worker_prefix(alive))) == 1
        remove_region_files(dead)
        assert region_files(worker_prefix(dead)) == []
        assert len(region_files(worker_prefix(alive))) == 1
        remove_region_files(dead)  # a second call (nothing left) is harmless
    finally:
        for handle in handles:
            try:
                shm.destroy_shared_memory_region(handle)
            except FileNotFoundError:
                pass  # removed by remove_region_files
    assert region_files(worker_prefix(alive)) == []


# ---------------------------------------------------------------------------------------------------------
# live: one detector against the real tritonserver
@live
def test_shared_memory_gives_the_inline_answers_and_gives_its_region_back(triton_url, inline_detector, real_images):
    """Pixels read from the region must be exactly the image sent; the region lives as long as the detector."""
    detector = TritonDetector(Settings(triton_url=triton_url))
    prefix = detector._regions.prefix
    try:
        with captured_spans() as spans:
            for image in real_images.values():  # different sizes through the same region
                want = inline_detector.detect(image)
                assert len(want.labels) >= 1
                assert_same_detections(detector.detect(image), want)
        assert transports(spans) == ["grpc", "system_shared_memory"] * len(real_images)
        regions = registered(triton_url, prefix)
        assert len(regions) == 1  # one request at a time: one region, reused
        (region,) = regions.values()
        assert os.path.exists(os.path.join(SHM_DIR, region["key"].lstrip("/")))
        assert region_files(prefix) != []
    finally:
        detector.close()
    assert registered(triton_url, prefix) == {}
    assert region_files(prefix) == []


@live
def test_an_image_larger_than_a_region_goes_inline(triton_url, inline_detector, real_images):
    """With max_side unset a huge image must not need a huge region: it is sent inside the request."""
    image = real_images["grace_hopper"]
    detector = TritonDetector(Settings(triton_url=triton_url, max_side=0, max_pixels=image.shape[0] * 10))
    try:
        with captured_spans() as spans:
            found = detector.detect(image)
            assert_same_detections(found, inline_detector.detect(image))
        assert transports(spans) == ["grpc", "grpc"]
        assert inline_reasons(spans) == [shared_memory.TOO_LARGE, None] and found.inline_reason == "too_large"
        assert registered(triton_url, detector._regions.prefix) == {}
        assert region_files(detector._regions.prefix) == []
    finally:
        detector.close()


@live
def test_regions_triton_forgot_are_registered_again(triton_url, inline_detector, real_images):
    """After a Triton restart the next request still goes through shared memory, not an error."""
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    detector = TritonDetector(Settings(triton_url=triton_url))
    prefix = detector._regions.prefix
    try:
        assert_same_detections(detector.detect(image), want)
        names = set(registered(triton_url, prefix))
        assert names
        with grpcclient.InferenceServerClient(triton_url) as admin:  # what a restarted Triton knows: nothing
            for name in names:
                admin.unregister_system_shared_memory(name)
        assert registered(triton_url, prefix) == {}

        with captured_spans() as spans:
            assert_same_detections(detector.detect(image), want)
        assert transports(spans) == ["system_shared_memory"]
        assert [span.attributes.get("rpc.grpc.status_code") for span in spans.get_finished_spans()] == [0]
        assert set(registered(triton_url, prefix)) == names
    finally:
        detector.close()
    assert registered(triton_url, prefix) == {}


@live
def test_a_region_being_created_while_another_thread_registers_again_is_kept(triton_url, inline_detector,
                                                                            real_images, monkeypatch):
    """A new region's registration racing a re-registration after a Triton restart (seen in CI: a duplicate
    registration, the region destroyed, its name reused and a 500). The race is made deterministic by wrapping
    the real Region.register so another thread's register_again runs first; both calls reach the real Triton."""
    image = real_images["grace_hopper"]
    detector = TritonDetector(Settings(triton_url=triton_url))
    pool = detector._regions
    real_register = shared_memory.Region.register
    interleaved = []

    def register_during_a_restart(region, client):
        if not interleaved:  # once, before the new region's own registration
            interleaved.append(region.name)
            pool.register_again()  # what a thread that just got "unable to find shared memory region" does
        real_register(region, client)

    try:
        with pool.lease() as first:
            monkeypatch.setattr(shared_memory.Region, "register", register_during_a_restart)
            with pool.lease() as second:
                assert second is not None and second.name != first.name
            monkeypatch.undo()
        assert interleaved == [second.name]
        assert set(registered(triton_url, pool.prefix)) == {first.name, second.name}
        with pool.lease() as again, pool.lease() as other:  # both back in the pool, neither destroyed
            assert {again.name, other.name} == {first.name, second.name}
        assert_same_detections(detector.detect(image), inline_detector.detect(image))
    finally:
        detector.close()
    assert registered(triton_url, pool.prefix) == {} and region_files(pool.prefix) == []


@live
def test_an_image_that_finds_every_region_in_use_goes_inline_and_says_so(triton_url, inline_detector, real_images,
                                                                         monkeypatch):
    """A pool of one region (the limit lowered from 64), held by a request in flight: the next image goes inline
    with reason pool_full, and the one after it, with the region free again, through shared memory."""
    monkeypatch.setattr(shared_memory, "MAX_REGIONS_PER_WORKER", 1)
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    detector = TritonDetector(Settings(triton_url=triton_url))
    try:
        with captured_spans() as spans:
            with detector._regions.lease():
                crowded = detector.detect(image)
            freed = detector.detect(image)
        assert_same_detections(crowded, want)
        assert_same_detections(freed, want)
        assert (crowded.transport, crowded.inline_reason) == ("grpc", shared_memory.POOL_FULL)
        assert (freed.transport, freed.inline_reason) == ("system_shared_memory", None)
        assert inline_reasons(spans) == [shared_memory.POOL_FULL, None]
    finally:
        detector.close()


@live
def test_a_gateway_whose_shared_memory_triton_cannot_map_sends_inline(triton_url, inline_detector, real_images,
                                                                       tmp_path):
    """Triton on another host or container: the first request finds out, warns once, and every request works."""
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    answer, stderr = detect_in_private_shm(triton_url, image, tmp_path)
    assert answer["shm_before"] == []  # the child really had a /dev/shm of its own
    assert answer["available"] is False and answer["reasons"] == [shared_memory.UNMAPPABLE] * 2
    assert answer["faces"] == [len(want.labels)] * 2
    for boxes, labels in zip(answer["boxes"], answer["labels"]):
        assert labels == want.labels
        np.testing.assert_allclose(np.array(boxes, np.float32).reshape(-1, 4), want.boxes, rtol=0, atol=1e-3)
    assert stderr.count(INLINE_WARNING) == 1, stderr  # found out once, not per request


@live
def test_a_gateway_that_cannot_create_regions_sends_inline(triton_url, inline_detector, real_images, tmp_path):
    """A /dev/shm this process cannot write (mounted read-only, as some hardened containers have it): every request
    works, sent inline, with one warning; it used to be a 500 per request."""
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    answer, stderr = detect_in_private_shm(triton_url, image, tmp_path, mount_options="ro")
    assert answer["available"] is False and answer["reasons"] == [shared_memory.SHM_UNUSABLE] * 2
    assert answer["faces"] == [len(want.labels)] * 2 and answer["labels"] == [want.labels] * 2
    assert stderr.count(INLINE_WARNING) == 1, stderr
    assert "cannot create a shared-memory region here" in stderr and "Read-only file system" in stderr


@live
def test_a_region_that_cannot_be_created_for_now_sends_that_image_inline_only(triton_url, inline_detector,
                                                                             real_images, tmp_path):
    """Out of file descriptors for a moment (EMFILE, caused for real with a lowered RLIMIT_NOFILE): that image goes
    inline and the worker keeps shared memory for the next one, unlike a /dev/shm it can never use."""
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    np.save(tmp_path / "image.npy", image)
    env = {key: value for key, value in os.environ.items() if key not in INHERITED_OBSERVABILITY_VARIABLES}
    done = subprocess.run([sys.executable, "-c", OUT_OF_DESCRIPTORS_CHILD, triton_url, str(tmp_path / "image.npy")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["labels"] == [want.labels] * 2
    assert answer["transports"] == ["grpc", "system_shared_memory"] and answer["available"] is True
    assert answer["reasons"] == [shared_memory.CREATE_FAILED, None]
    assert "could not create a shared-memory region" in done.stderr and "Too many open files" in done.stderr
    assert INLINE_WARNING not in done.stderr


@live
def test_a_triton_that_comes_back_unable_to_map_the_regions_gets_pixels_inline(triton_url, inline_detector,
                                                                               real_images):
    """Triton restarted in a container with a /dev/shm of its own (compose's `ipc: shareable` after a restart): it
    has forgotten the regions and cannot open them again. The next request falls back to inline, not an error,
    and so does every later one. Made real by taking the region files out of Triton's sight while it forgets the
    registrations, then putting them back for the clean-up."""
    image = real_images["grace_hopper"]
    want = inline_detector.detect(image)
    detector = TritonDetector(Settings(triton_url=triton_url))
    pool = detector._regions
    moved = []
    try:
        assert_same_detections(detector.detect(image), want)
        names = set(registered(triton_url, pool.prefix))
        assert names
        with grpcclient.InferenceServerClient(triton_url) as admin:
            for name in names:
                admin.unregister_system_shared_memory(name)
        for path in region_files(pool.prefix):
            os.rename(path, path + ".elsewhere")
            moved.append(path)
        for _ in range(2):
            with captured_spans() as spans:
                assert_same_detections(detector.detect(image), want)
            assert transports(spans) == ["grpc"] and inline_reasons(spans) == [shared_memory.UNMAPPABLE]
        assert pool.unavailable == shared_memory.UNMAPPABLE and registered(triton_url, pool.prefix) == {}
    finally:
        for path in moved:
            os.rename(path + ".elsewhere", path)
        detector.close()
    assert region_files(pool.prefix) == []


@live
def test_a_gateway_triton_cannot_map_leaves_other_gateways_regions_alone(triton_url, real_images, tmp_path):
    """A remote gateway's /dev/shm says nothing about which of Triton's regions are orphaned."""
    image = real_images["grace_hopper"]
    neighbour = TritonDetector(Settings(triton_url=triton_url))
    prefix = neighbour._regions.prefix
    try:
        neighbour.detect(image)
        names = set(registered(triton_url, prefix))
        assert names
        answer, _ = detect_in_private_shm(triton_url, image, tmp_path)
        assert answer["available"] is False
        assert set(registered(triton_url, prefix)) == names
    finally:
        neighbour.close()


# ---------------------------------------------------------------------------------------------------------
# live: gunicorn's hooks
@live
def test_a_killed_workers_regions_are_freed_and_unregistered(gateway_stack, hopper_jpeg, tmp_path):
    """SIGKILL skips worker_exit: the master frees the memory, the next worker unregisters it from Triton.

    The master also drops the dead worker's in-flight count (its live gauge file), else a request it was serving
    would show as in flight for ever, and its exemplar file, else /metrics would go on reading a dead process's.
    """
    triton_url = gateway_stack.triton.grpc_url
    env = gateway_stack.environment(free_port(), {"GATEWAY_WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    gunicorn = Gunicorn(env, gateway_stack.log_dir / "shared-memory.log").start()
    master = gunicorn.process.pid
    worker_pids: list[int] = []

    def post(headers=None):
        return requests.post(gunicorn.url + "/v1/detect", data=hopper_jpeg,
                             headers={"Content-Type": "image/jpeg", **(headers or {})}, timeout=60)

    try:
        assert post({"traceparent": f"00-{SAMPLED_TRACE_ID}-{'cd' * 8}-01"}).status_code == 200
        (worker,) = children(master)
        worker_pids.append(worker)
        exemplars = tmp_path / f"exemplars_{worker}.json"  # written by the worker's flush thread, soon after
        deadline = time.monotonic() + 30
        while SAMPLED_TRACE_ID not in (exemplars.read_text() if exemplars.exists() else ""):
            assert time.monotonic() < deadline, f"the sampled request left no exemplar in {exemplars}"
            time.sleep(0.1)
        dead_prefix = worker_prefix(worker)
        dead_files = region_files(dead_prefix)
        dead_regions = set(registered(triton_url, dead_prefix))
        assert dead_files and dead_regions
        stalled = socket.create_connection(("127.0.0.1", gunicorn.port))  # in flight until the worker dies
        stalled.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                        b"Content-Length: 100000\r\n\r\n\xff\xd8\xff\xe0")
        deadline = time.monotonic() + 30
        while scraped(gunicorn.url + "/metrics")[IN_FLIGHT] != 1.0:
            assert time.monotonic() < deadline, "the stalled upload never counted as in flight"
            time.sleep(0.1)

        # Its resource tracker (multiprocessing's, a child of the worker) would unlink the memory too: kill it
        # first, as an OOM kill of the whole cgroup would, so only the master's child_exit can free it.
        for helper in children(worker):
            os.kill(helper, signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + WORKER_RESPAWN_TIMEOUT_S
        while True:
            respawned = [pid for pid in children(master) if pid != worker]
            left = [path for path in [*dead_files, str(exemplars)] if os.path.exists(path)]
            if respawned and not left:
                break
            assert time.monotonic() < deadline, f"no new worker or {left} still there; see {gunicorn.log_path}"
            time.sleep(0.1)
        (new_worker,) = respawned
        worker_pids.append(new_worker)
        stalled.close()
        assert scraped(gunicorn.url + "/metrics")[IN_FLIGHT] == 0.0
        assert set(registered(triton_url, dead_prefix)) == dead_regions  # Triton still maps the freed memory

        assert post().status_code == 200  # the new worker's first registration sweeps the orphans
        assert registered(triton_url, dead_prefix) == {}
        assert region_files(worker_prefix(new_worker)) and registered(triton_url, worker_prefix(new_worker))
    finally:
        gunicorn.stop()
    for pid in worker_pids:  # a graceful stop (worker_exit) leaves nothing behind
        assert region_files(worker_prefix(pid)) == []
        assert registered(triton_url, worker_prefix(pid)) == {}


# ---------------------------------------------------------------------------------------------------------
# concurrency: a region is leased to one request at a time
def mixed_frames(real_images) -> list[np.ndarray]:
    """Four different frames of three sizes: a region reused too early would hand one request another's pixels."""
    hopper, astronaut = real_images["grace_hopper"], real_images["astronaut"]
    return [hopper, astronaut, np.ascontiguousarray(hopper[:, ::-1]),
            cv2.resize(astronaut, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC)]


@live
def test_concurrent_requests_each_get_their_own_pixels_back(triton_url, inline_detector, real_images):
    frames = mixed_frames(real_images)
    expected = [inline_detector.detect(frame) for frame in frames]
    detector = TritonDetector(Settings(triton_url=triton_url))
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda index: (index % 4, detector.detect(frames[index % 4])), range(48)))
        for index, got in answers:
            assert_same_detections(got, expected[index])
        regions = registered(triton_url, detector._regions.prefix)
        assert 1 < len(regions) <= 12  # requests overlapped, and no more regions than requests in flight
    finally:
        detector.close()


@live
def test_concurrent_batches_through_gunicorn_keep_every_image_its_own_answer(gateway_stack, inline_detector,
                                                                             real_images):
    """Two workers x four threads x a batch pool of four, all leasing regions at once; every answer in place."""
    frames = mixed_frames(real_images)
    expected = [inline_detector.detect(frame) for frame in frames]
    files = [("images", (f"{index}.png", encode(frame, ".png"), "image/png")) for index, frame in enumerate(frames)]

    def batch(_):
        return requests.post(gateway_stack.url + "/v1/detect/batch", files=files, timeout=120)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(batch, range(8)))
    for response in responses:
        assert response.status_code == 200, response.text
        for result, want in zip(response.json()["results"], expected, strict=True):
            assert [d["label"] for d in result["detections"]] == want.labels
            np.testing.assert_allclose([d["box"] for d in result["detections"]], want.boxes.reshape(-1, 4),
                                       rtol=0, atol=0.02)
