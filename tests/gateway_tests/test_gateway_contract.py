"""The live gateway (gunicorn + tritonserver) answers as documented and as the in-process reference does."""
from dataclasses import replace

import cv2
import numpy as np
import pytest
from openapi_spec_validator import validate as validate_spec

from gateway.annotate import JPEG_QUALITY
from gateway.openapi import openapi_document
from gateway_helpers import (assert_matches_reference, documented_examples, encode, jpeg_with_orientation, json_shape,
                             matched_iou, schema_validator)

pytestmark = pytest.mark.triton

def post_image(http, url, data, content_type="image/jpeg", **kwargs):
    return http.post(url + "/v1/detect", data=data, headers={"Content-Type": content_type, **kwargs.pop(
        "headers", {})}, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def uploads(real_images, hopper_jpeg):
    """Each real image as sent (hopper: its original JPEG; astronaut: lossless PNG) and its decoded pixels."""
    astronaut_png = encode(real_images["astronaut"], ".png")
    hopper_pixels = cv2.imdecode(np.frombuffer(hopper_jpeg, np.uint8), cv2.IMREAD_COLOR)
    return {
        "grace_hopper": (hopper_jpeg, "image/jpeg", hopper_pixels),
        "astronaut": (astronaut_png, "image/png", real_images["astronaut"]),
    }


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_raw_body_matches_reference_pipeline(gateway_url, http, uploads, reference_pipeline, name):
    data, content_type, pixels = uploads[name]
    response = post_image(http, gateway_url, data, content_type)
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["detections"]) >= 1
    assert_matches_reference(body, reference_pipeline.detect(pixels), pixels.shape)
    assert body["model"] == {"name": "mask_detection", "version": "1"}
    assert body["request_id"] == response.headers["X-Request-ID"]
    stages = dict(part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    assert set(stages) == {"decode", "inference", "encode", "total"}
    assert float(stages["total"]) >= float(stages["inference"]) > 0


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_multipart_matches_reference_pipeline(gateway_url, http, uploads, reference_pipeline, name):
    data, content_type, pixels = uploads[name]
    response = http.post(gateway_url + "/v1/detect", files={"image": (f"{name}.img", data, content_type)}, timeout=60)
    assert response.status_code == 200, response.text
    assert_matches_reference(response.json(), reference_pipeline.detect(pixels), pixels.shape)


def test_thresholds_reach_triton(gateway_url, http, uploads, reference_pipeline):
    """confidence and max_faces must reach Triton's postprocess: the answer is the reference's with the same values."""
    data, content_type, pixels = uploads["grace_hopper"]
    strict = post_image(http, gateway_url, data, content_type, params={"confidence": "1"}).json()
    assert strict["detections"] == []
    loose = post_image(http, gateway_url, data, content_type, params={"confidence": "0.05", "max_faces": "2"})
    assert loose.status_code == 200, loose.text
    params = reference_pipeline.params
    expected = reference_pipeline.detect(pixels, replace(params, confidence=0.05, max_faces=2))
    assert len(reference_pipeline.detect(pixels)) < 2  # the default confidence would keep fewer faces ...
    assert len(reference_pipeline.detect(pixels, replace(params, confidence=0.05))) > 2  # ... max_faces alone, more
    assert len(loose.json()["detections"]) == len(expected) == 2
    assert_matches_reference(loose.json(), expected, pixels.shape)


def test_batch_matches_reference_in_request_order(gateway_url, http, uploads, reference_pipeline):
    files = [("images", ("astronaut.png", uploads["astronaut"][0], "image/png")),
             ("images", ("notes.txt", b"definitely not an image", "text/plain")),
             ("images", ("grace_hopper.jpg", uploads["grace_hopper"][0], "image/jpeg"))]
    response = http.post(gateway_url + "/v1/detect/batch", files=files, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["astronaut.png", "notes.txt", "grace_hopper.jpg"]
    assert results[1]["error"]["code"] == "unsupported_media_type"
    for result, name in ((results[0], "astronaut"), (results[2], "grace_hopper")):
        pixels = uploads[name][2]
        assert_matches_reference(result, reference_pipeline.detect(pixels), pixels.shape)


def box_edges(box, image_shape, points=10):
    """(y, x) points on each of a box's four edges (its corners and the image border left out), by edge name."""
    x1, y1, x2, y2 = (round(v) for v in box)
    xs, ys = np.linspace(x1, x2, points + 2)[1:-1].round().astype(int), np.linspace(y1, y2, points + 2)[1:-1]
    ys = ys.round().astype(int)
    edges = {"top": [(y1, x) for x in xs], "bottom": [(y2, x) for x in xs],
             "left": [(y, x1) for y in ys], "right": [(y, x2) for y in ys]}
    height, width = image_shape[:2]
    return {name: points for name, points in edges.items()
            if all(0 <= y < height and 0 <= x < width for y, x in points)}


def test_annotated_jpeg_has_the_original_size(gateway_url, http, uploads, artifacts_dir):
    """Accept: image/jpeg draws each JSON detection's box, in its label's colour, and changes nothing else."""
    data, content_type, pixels = uploads["grace_hopper"]
    detections = post_image(http, gateway_url, data, content_type).json()["detections"]
    assert detections
    response = post_image(http, gateway_url, data, content_type, headers={"Accept": "image/jpeg"})
    assert response.status_code == 200 and response.headers["Content-Type"] == "image/jpeg"
    (artifacts_dir / "gateway").mkdir(exist_ok=True)
    (artifacts_dir / "gateway" / "annotated_grace_hopper.jpg").write_bytes(response.content)
    annotated = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
    assert annotated.shape == pixels.shape
    for detection in detections:  # docs/gateway.md: green for mask, red for no mask
        channel = {"mask": 1, "no_mask": 2}[detection["label"]]  # BGR
        edges = box_edges(detection["box"], pixels.shape)
        assert len(edges) == 4  # hopper's face is well inside the picture
        for name, points in edges.items():
            colour = np.median([annotated[y, x] for y, x in points], axis=0)
            others = np.delete(colour, channel)
            assert colour[channel] > 150 and colour[channel] - others.max() > 80, (detection["label"], name, colour)
    # Against the same pixels re-encoded without boxes, the pictures differ only around the boxes (their JPEG
    # blocks, and the caption above), not inside them nor anywhere else.
    _, plain = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    changed = np.abs(annotated.astype(int) - cv2.imdecode(plain, cv2.IMREAD_COLOR)).max(axis=2) > 8
    near_a_box, deep_inside = np.zeros_like(changed), np.zeros_like(changed)
    for x1, y1, x2, y2 in ((round(v) for v in d["box"]) for d in detections):
        near_a_box[max(0, y1 - 48):y2 + 16, max(0, x1 - 16):x2 + 16] = True
        deep_inside[y1 + 16:y2 - 16, x1 + 16:x2 - 16] = True
    assert changed.sum() > 0 and not changed[~near_a_box].any() and not changed[deep_inside].any()


def test_exif_orientation_gives_boxes_in_displayed_coordinates(gateway_url, http, uploads, reference_pipeline):
    upright = uploads["grace_hopper"][2]  # 512 wide, 600 high
    stored = cv2.rotate(upright, cv2.ROTATE_90_COUNTERCLOCKWISE)  # what the sensor wrote: 600 wide, 512 high
    data = jpeg_with_orientation(stored, 6)  # Orientation 6: rotate 90 degrees clockwise to display
    displayed = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert displayed.shape == upright.shape
    body = post_image(http, gateway_url, data).json()
    assert_matches_reference(body, reference_pipeline.detect(displayed), upright.shape)
    upright_boxes = reference_pipeline.detect(upright).boxes
    assert matched_iou([d["box"] for d in body["detections"]], upright_boxes).min() >= 0.9


def test_request_id_is_echoed_when_safe_and_replaced_when_not(gateway_url, http):
    good = http.get(gateway_url + "/healthz", headers={"X-Request-ID": "trace-me.42"})
    assert good.headers["X-Request-ID"] == "trace-me.42"
    bad = http.get(gateway_url + "/healthz", headers={"X-Request-ID": "<script>"})
    assert bad.headers["X-Request-ID"] != "<script>" and bad.headers["X-Request-ID"].isalnum()


def test_probes_page_and_metrics(gateway_url, http, hopper_jpeg):
    assert post_image(http, gateway_url, hopper_jpeg).status_code == 200  # so /metrics has a detection to count
    assert http.get(gateway_url + "/healthz").json() == {"status": "ok"}
    ready = http.get(gateway_url + "/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "mask_detection"
    page = http.get(gateway_url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
    metrics = http.get(gateway_url + "/metrics").text
    assert 'flask_http_request_duration_seconds_count{endpoint="api.detect",method="POST",status="200"}' in metrics
    assert "flask_http_request_duration_seconds_bucket" in metrics


# --- the OpenAPI document ---

def test_openapi_document_is_valid_and_served(gateway_url, http):
    document = openapi_document()
    validate_spec(document)
    assert http.get(gateway_url + "/openapi.json").json() == document
    for name, example in [("DetectResponse", documented_examples(document, "/v1/detect", "200")[0]),
                          ("BatchResponse", documented_examples(document, "/v1/detect/batch", "200")[0])]:
        schema_validator(document, name).validate(example)


def test_openapi_examples_match_live_responses(gateway_url, http, uploads):
    document = openapi_document()
    data, content_type, _ = uploads["grace_hopper"]
    live = {
        ("/v1/detect", "200"): post_image(http, gateway_url, data, content_type),
        ("/v1/detect/batch", "200"): http.post(gateway_url + "/v1/detect/batch", timeout=60, files=[
            ("images", ("grace_hopper.jpg", data, "image/jpeg")), ("images", ("notes.txt", b"text", "text/plain"))]),
        ("/v1/detect", "400"): post_image(http, gateway_url, b"not an image"),
        ("/v1/detect", "413"): post_image(http, gateway_url, b"\x00" * (10 * 1024 * 1024 + 1)),
        ("/v1/detect", "415"): post_image(http, gateway_url, data, "text/plain"),
        ("/v1/detect", "422"): post_image(http, gateway_url, data, content_type, params={"confidence": "-1"}),
        ("/healthz", "200"): http.get(gateway_url + "/healthz"),
        ("/readyz", "200"): http.get(gateway_url + "/readyz"),
    }
    schemas = {"200": {"/v1/detect": "DetectResponse", "/v1/detect/batch": "BatchResponse",
                       "/healthz": "Health", "/readyz": "Ready"}}
    for (path, status), response in live.items():
        assert str(response.status_code) == status, (path, status, response.text)
        body = response.json()
        schema_validator(document, schemas.get(status, {}).get(path, "Error")).validate(body)
        for example in documented_examples(document, path, status):
            assert json_shape(example) == json_shape(body), (path, status)
