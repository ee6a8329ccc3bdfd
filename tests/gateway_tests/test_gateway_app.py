"""The Flask app in process on the session's real tritonserver: answers, headers, errors, outage, trace context."""
import io
import threading
from dataclasses import replace

import cv2
import numpy as np
import pytest
from gateway_helpers import (FakeDetector, assert_matches_reference, encode, free_port, matched_iou,
                             server_like_client)

from gateway import create_app, triton_client
from gateway.settings import Settings

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
MAX_SIDE = 1000  # below the two-face image's 2048 px width, so it is downscaled before Triton
live = pytest.mark.triton


def app_client(triton_url, **settings):
    """A test client of the app whose real gRPC client (gateway.triton_client.worker_detector) talks to `triton_url`."""
    return server_like_client(create_app({"SETTINGS": Settings(triton_url=triton_url, **settings)}))


def down_url() -> str:
    """Where no Triton listens: calls fail as they do when Triton is down."""
    return f"127.0.0.1:{free_port()}"


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module", autouse=True)
def _close_real_clients():
    """The app's per-process Triton clients are closed after the module, so their shared memory is given back."""
    yield
    triton_client.close_worker_detectors()


@pytest.fixture
def client(gateway_stack):
    triton = gateway_stack.triton
    return app_client(triton.grpc_url, max_side=MAX_SIDE, triton_metrics_url=triton.metrics_url)


@pytest.fixture(scope="module")
def two_faces(real_images):
    """grace_hopper and astronaut side by side, upscaled 2x (2048x1200, two no_mask faces): its JPEG and pixels."""
    hopper, astronaut = real_images["grace_hopper"], real_images["astronaut"]
    astronaut = cv2.copyMakeBorder(astronaut, 0, hopper.shape[0] - astronaut.shape[0], 0, 0, cv2.BORDER_CONSTANT)
    tiled = cv2.resize(np.hstack([hopper, astronaut]), None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    jpeg = encode(tiled, ".jpg")
    return jpeg, decoded(jpeg)


def reference_after_shrinking(reference_pipeline, image, max_side, full_shape, **overrides):
    """The reference's answer for `image` shrunk to `max_side` (bilinear below 2:1, else an area average), boxes
    in pixels of `full_shape`."""
    factor = max_side / max(image.shape[:2])
    sent = cv2.resize(image, (round(image.shape[1] * factor), round(image.shape[0] * factor)),
                      interpolation=cv2.INTER_LINEAR if factor > 0.5 else cv2.INTER_AREA)
    found = reference_pipeline.detect(sent, replace(reference_pipeline.params, **overrides))
    scale = np.array([sent.shape[1] / full_shape[1], sent.shape[0] / full_shape[0]] * 2)
    return replace(found, boxes=found.boxes / scale)


def reference_as_the_gateway_sends(reference_pipeline, jpeg, pixels, max_side, **overrides):
    """The reference's answer for `jpeg` as the gateway sends it: a JPEG at least twice `max_side` is decoded
    at half scale (libjpeg's scaled decode), then shrunk; written out independently of gateway/imaging.py."""
    half = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)
    assert max(half.shape[:2]) >= max_side  # this image is one the gateway decodes at half scale
    return reference_after_shrinking(reference_pipeline, half, max_side, pixels.shape, **overrides)


@pytest.fixture
def headers_to_triton(monkeypatch):
    """The gRPC metadata the real client sends Triton, recorded by a spy that calls through to the real function."""
    sent = []
    real = triton_client.triton_trace_headers

    def spy():
        headers = real()
        sent.append(headers)
        return headers

    monkeypatch.setattr(triton_client, "triton_trace_headers", spy)  # TritonDetector._infer looks it up here
    return sent


@live
def test_detect_maps_boxes_back_and_sets_headers(client, two_faces, reference_pipeline):
    jpeg, pixels = two_faces
    response = client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg", "X-Request-ID": "abc-123"})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert list(body) == ["request_id", "image", "model", "detections", "timing_ms"]
    assert body["request_id"] == response.headers["X-Request-ID"] == "abc-123"
    assert body["image"] == {"width": 2048, "height": 1200}
    assert len(body["detections"]) == 2
    # Decoded at half scale, downscaled to MAX_SIDE before Triton, boxes mapped back to the original's pixels.
    expected = reference_as_the_gateway_sends(reference_pipeline, jpeg, pixels, MAX_SIDE)
    assert_matches_reference(body, expected, pixels.shape)
    # What the scaled decode costs in accuracy, against a full decode resized the same way: nothing that matters.
    from_full = reference_after_shrinking(reference_pipeline, pixels, MAX_SIDE, pixels.shape)
    assert [d["label"] for d in body["detections"]] == list(from_full.labels)
    assert matched_iou([d["box"] for d in body["detections"]], from_full.boxes).min() >= 0.95
    np.testing.assert_allclose([d["score"] for d in body["detections"]], from_full.scores, atol=0.01)
    np.testing.assert_allclose([d["label_score"] for d in body["detections"]], from_full.label_scores, atol=0.01)
    timing = response.headers["Server-Timing"]
    assert timing.startswith("decode;dur=") and "inference;dur=" in timing and "total;dur=" in timing


@live
def test_max_faces_reaches_triton(client, two_faces, reference_pipeline):
    jpeg, pixels = two_faces
    response = client.post("/v1/detect?max_faces=1", data=jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.get_data(as_text=True)
    expected = reference_as_the_gateway_sends(reference_pipeline, jpeg, pixels, MAX_SIDE, max_faces=1)
    assert len(expected) == 1
    assert_matches_reference(response.get_json(), expected, pixels.shape)


@live
def test_accept_jpeg_returns_the_annotated_image_at_original_size(client, two_faces):
    jpeg, pixels = two_faces
    detections = client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg"}).get_json()["detections"]
    assert [d["label"] for d in detections] == ["no_mask", "no_mask"]
    response = client.post("/v1/detect", data=jpeg, headers={"Content-Type": "image/jpeg", "Accept": "image/jpeg"})
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    annotated = decoded(response.data)
    assert annotated.shape == pixels.shape
    for x1, _, x2, y2 in (d["box"] for d in detections):
        b, g, r = annotated[round(y2), round((x1 + x2) / 2)].astype(int)  # on the bottom edge: red for "no_mask"
        assert r > 150 and g < 100 and b < 100, (b, g, r)


@live
def test_a_sampled_caller_trace_continues_to_triton(client, headers_to_triton, hopper_jpeg):
    response = client.post("/v1/detect", data=hopper_jpeg, headers={
        "Content-Type": "image/jpeg", "traceparent": f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"})
    assert response.status_code == 200
    assert headers_to_triton[-1]["traceparent"].split("-")[1] == CALLER_TRACE_ID


@live
def test_a_sampled_out_caller_trace_sends_nothing_to_triton(client, headers_to_triton, hopper_jpeg):
    response = client.post("/v1/detect", data=hopper_jpeg, headers={
        "Content-Type": "image/jpeg", "traceparent": f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-00"})
    assert response.status_code == 200
    assert headers_to_triton and headers_to_triton[-1] is None


@live
def test_batch_keeps_order_and_isolates_bad_images(client, hopper_jpeg, reference_pipeline):
    response = client.post("/v1/detect/batch", content_type="multipart/form-data", data={"images": [
        (io.BytesIO(hopper_jpeg), "a.jpg", "image/jpeg"),
        (io.BytesIO(b"not an image"), "b.bin", "application/octet-stream"),
        (io.BytesIO(b""), "c.png", "image/png"),
        (io.BytesIO(encode(np.zeros((40, 30, 3), np.uint8))), "d.png", "image/png"),
    ]})
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["a.jpg", "b.bin", "c.png", "d.png"]
    hopper = decoded(hopper_jpeg)
    assert_matches_reference(results[0], reference_pipeline.detect(hopper), hopper.shape)
    assert results[1]["error"]["code"] == "invalid_image"
    assert results[2]["error"]["code"] == "empty_body"
    assert results[3]["image"] == {"width": 30, "height": 40} and results[3]["detections"] == []


@live
def test_a_batch_over_its_byte_limit_is_refused_whole(gateway_stack, hopper_jpeg):
    """GATEWAY_MAX_BATCH_BYTES bounds the whole request: 413 for two images where one fits."""
    limit = len(hopper_jpeg) * 3 // 2
    triton = gateway_stack.triton
    client = app_client(triton.grpc_url, max_batch_bytes=limit, triton_metrics_url=triton.metrics_url)
    response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                           data={"images": [(io.BytesIO(hopper_jpeg), f"{i}.jpg", "image/jpeg") for i in range(2)]})
    assert response.status_code == 413, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert error["code"] == "payload_too_large" and str(limit) in error["message"]
    one = client.post("/v1/detect/batch", content_type="multipart/form-data",
                      data={"images": [(io.BytesIO(hopper_jpeg), "0.jpg", "image/jpeg")]})
    assert one.status_code == 200 and one.get_json()["results"][0]["detections"]


@live
def test_an_image_over_the_body_limit_fails_alone_in_a_batch(gateway_stack, hopper_jpeg, reference_pipeline):
    """GATEWAY_MAX_BODY_BYTES holds for each image of a batch: the one over it fails, the others are answered."""
    hopper = decoded(hopper_jpeg)
    too_large = encode(hopper, ".png")  # the same picture, losslessly and so much larger
    assert len(too_large) > len(hopper_jpeg)
    triton = gateway_stack.triton
    client = app_client(triton.grpc_url, max_body_bytes=len(hopper_jpeg), triton_metrics_url=triton.metrics_url)
    response = client.post("/v1/detect/batch", content_type="multipart/form-data", data={"images": [
        (io.BytesIO(too_large), "large.png", "image/png"), (io.BytesIO(hopper_jpeg), "fits.jpg", "image/jpeg")]})
    assert response.status_code == 200, response.get_data(as_text=True)
    large, fits = response.get_json()["results"]
    assert large["filename"] == "large.png" and set(large) == {"index", "filename", "error"}
    assert large["error"]["code"] == "payload_too_large" and str(len(hopper_jpeg)) in large["error"]["message"]
    assert fits["filename"] == "fits.jpg"  # exactly at the limit: still accepted
    assert_matches_reference(fits, reference_pipeline.detect(hopper), hopper.shape)


def test_batch_fails_whole_when_triton_is_down(hopper_jpeg):
    url = down_url()
    client = app_client(url, retry_after_s=7)
    response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                           data={"images": [(io.BytesIO(hopper_jpeg), "a.jpg")] * 2})
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"
    assert response.get_json()["error"]["code"] == "triton_unreachable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["error"]["code"] == "triton_unreachable"
    assert ready.get_json()["error"]["message"].startswith(f"Triton at {url} is unreachable")


class CountingDetector:
    """The real Triton client, counting the calls made through it."""

    def __init__(self, real):
        self.real, self.calls, self._lock = real, 0, threading.Lock()

    def detect(self, image, parameters=None):
        with self._lock:
            self.calls += 1
        return self.real.detect(image, parameters)


@live
def test_a_batch_stops_sending_images_once_triton_fails_it_whole(gateway_stack, hopper_jpeg):
    """Triton answers the first image "model not ready": the batch's answer is that 503, and the images not yet
    sent are not sent to a Triton that is failing (Executor.map cancels the futures not started)."""
    settings = Settings(triton_url=gateway_stack.triton.grpc_url, model_name="no_such_model", batch_concurrency=1,
                        triton_shared_memory="off")
    counting = CountingDetector(triton_client.TritonDetector(settings))
    try:
        client = server_like_client(create_app({"SETTINGS": settings, "DETECTOR": counting}))
        response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                               data={"images": [(io.BytesIO(hopper_jpeg), f"{index}.jpg") for index in range(6)]})
    finally:
        counting.real.close()
    assert response.status_code == 503 and response.get_json()["error"]["code"] == "model_not_ready"
    # the pool's one thread may take the second image before the failure of the first is seen: at most two calls
    assert 1 <= counting.calls <= 2


def test_unexpected_errors_carry_no_internals(hopper_jpeg):
    # The fake: no real Triton call raises a KeyError, and the catch-all 500 must not leak it.
    client = server_like_client(create_app({"SETTINGS": Settings(),
                                            "DETECTOR": FakeDetector(fail_with=KeyError("secret"))}))
    response = client.post("/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)


def test_unknown_routes_and_methods_are_json():
    client = app_client(down_url())  # answered before any Triton call
    for response, status in ((client.get("/nope"), 404), (client.get("/v1/detect"), 405)):
        assert response.status_code == status
        assert set(response.get_json()) == {"error", "request_id"}
        assert response.headers["X-Request-ID"]


def test_too_many_batch_images_is_422(hopper_jpeg):
    client = app_client(down_url(), max_batch_images=2)  # refused before any Triton call (else 503)
    response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                           data={"images": [(io.BytesIO(hopper_jpeg), f"{i}.jpg") for i in range(3)]})
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "too_many_images"


@live
def test_metrics_count_requests_by_endpoint_and_status(client, hopper_jpeg):
    assert client.post("/v1/detect", data=hopper_jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
    client.post("/v1/detect", data=b"", headers={"Content-Type": "image/jpeg"})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'flask_http_request_duration_seconds_count{endpoint="api.detect",method="POST",status="200"} 1.0' in text
    assert 'flask_http_request_duration_seconds_count{endpoint="api.detect",method="POST",status="400"} 1.0' in text
