"""The Flask app with Triton replaced by a fake: response shapes, headers, error mapping, trace propagation."""
import io

import cv2
import numpy as np
import pytest

from gateway import create_app
from gateway.errors import TritonUnreachable
from gateway.settings import Settings
from gateway_helpers import FakeDetector, encode

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def fake():
    return FakeDetector()


@pytest.fixture
def client(fake):
    return create_app({"SETTINGS": Settings(max_side=1000), "DETECTOR": fake}).test_client()


@pytest.fixture(scope="module")
def wide_jpeg():
    return encode(np.full((600, 2000, 3), 90, np.uint8), ".jpg")


def test_detect_maps_boxes_back_and_sets_headers(client, fake, wide_jpeg):
    response = client.post("/v1/detect?max_faces=2", data=wide_jpeg,
                           headers={"Content-Type": "image/jpeg", "X-Request-ID": "abc-123"})
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["request_id", "image", "model", "detections", "timing_ms"]
    assert body["request_id"] == response.headers["X-Request-ID"] == "abc-123"
    assert body["image"] == {"width": 2000, "height": 600}
    assert fake.calls[0]["shape"] == (300, 1000, 3)  # downscaled to max_side before Triton
    assert fake.calls[0]["parameters"] == {"max_faces": 2}
    assert body["detections"] == [{"box": [500.0, 150.0, 1000.0, 300.0], "score": 0.9, "label": "mask",
                                   "label_score": 0.8}]
    timing = response.headers["Server-Timing"]
    assert timing.startswith("decode;dur=") and "inference;dur=" in timing and "total;dur=" in timing


def test_accept_jpeg_returns_the_annotated_image_at_original_size(client, wide_jpeg):
    response = client.post("/v1/detect", data=wide_jpeg, headers={"Content-Type": "image/jpeg",
                                                                   "Accept": "image/jpeg"})
    assert response.status_code == 200 and response.mimetype == "image/jpeg"
    annotated = cv2.imdecode(np.frombuffer(response.data, np.uint8), cv2.IMREAD_COLOR)
    assert annotated.shape == (600, 2000, 3)
    b, g, r = annotated[150, 750].astype(int)  # on the top edge of the box: green for "mask"
    assert g > 150 and r < 100


def test_a_sampled_caller_trace_continues_to_triton(client, fake, wide_jpeg):
    client.post("/v1/detect", data=wide_jpeg, headers={
        "Content-Type": "image/jpeg", "traceparent": f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"})
    assert fake.calls[-1]["headers"]["traceparent"].split("-")[1] == CALLER_TRACE_ID


def test_a_sampled_out_caller_trace_sends_nothing_to_triton(client, fake, wide_jpeg):
    client.post("/v1/detect", data=wide_jpeg, headers={
        "Content-Type": "image/jpeg", "traceparent": f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-00"})
    assert fake.calls[-1]["headers"] is None


def test_batch_keeps_order_and_isolates_bad_images(client, wide_jpeg):
    response = client.post("/v1/detect/batch", content_type="multipart/form-data", data={"images": [
        (io.BytesIO(wide_jpeg), "a.jpg", "image/jpeg"),
        (io.BytesIO(b"not an image"), "b.bin", "application/octet-stream"),
        (io.BytesIO(b""), "c.png", "image/png"),
        (io.BytesIO(encode(np.zeros((40, 30, 3), np.uint8))), "d.png", "image/png"),
    ]})
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["a.jpg", "b.bin", "c.png", "d.png"]
    assert results[0]["image"] == {"width": 2000, "height": 600}
    assert results[1]["error"]["code"] == "invalid_image"
    assert results[2]["error"]["code"] == "empty_body"
    assert results[3]["image"] == {"width": 30, "height": 40}


def test_batch_fails_whole_when_triton_is_down(wide_jpeg):
    down = FakeDetector(fail_with=TritonUnreachable("the Triton inference server is unreachable; retry later"))
    client = create_app({"SETTINGS": Settings(retry_after_s=7), "DETECTOR": down}).test_client()
    response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                           data={"images": [(io.BytesIO(wide_jpeg), "a.jpg")] * 2})
    assert response.status_code == 503 and response.headers["Retry-After"] == "7"
    assert response.get_json()["error"]["code"] == "triton_unreachable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["error"]["message"] == "fake Triton is down"


def test_unexpected_errors_carry_no_internals(wide_jpeg):
    client = create_app({"SETTINGS": Settings(), "DETECTOR": FakeDetector(fail_with=KeyError("secret"))}).test_client()
    response = client.post("/v1/detect", data=wide_jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in response.get_data(as_text=True)


def test_unknown_routes_and_methods_are_json(client):
    for response, status in ((client.get("/nope"), 404), (client.get("/v1/detect"), 405)):
        assert response.status_code == status
        assert set(response.get_json()) == {"error", "request_id"}
        assert response.headers["X-Request-ID"]


def test_too_many_batch_images_is_422(wide_jpeg):
    client = create_app({"SETTINGS": Settings(max_batch_images=2), "DETECTOR": FakeDetector()}).test_client()
    response = client.post("/v1/detect/batch", content_type="multipart/form-data",
                           data={"images": [(io.BytesIO(wide_jpeg), f"{i}.jpg") for i in range(3)]})
    assert response.status_code == 422 and response.get_json()["error"]["code"] == "too_many_images"


def test_metrics_count_requests_by_endpoint_and_status(client, wide_jpeg):
    client.post("/v1/detect", data=wide_jpeg, headers={"Content-Type": "image/jpeg"})
    client.post("/v1/detect", data=b"", headers={"Content-Type": "image/jpeg"})
    text = client.get("/metrics").get_data(as_text=True)
    assert 'flask_http_request_duration_seconds_count{endpoint="api.detect",method="POST",status="200"} 1.0' in text
    assert 'flask_http_request_duration_seconds_count{endpoint="api.detect",method="POST",status="400"} 1.0' in text
