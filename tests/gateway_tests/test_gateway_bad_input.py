"""Bad uploads and parameters get the documented status and a JSON body naming the problem; workers survive."""
import http.client
import json
import re

import numpy as np
import pytest
import requests
from urllib3 import encode_multipart_formdata

from gateway_helpers import children, corrupted, encode, png_bomb_header

pytestmark = pytest.mark.triton

TEN_MIB = 10 * 1024 * 1024
# What a damaged image may be refused with: undecodable, or a header now claiming too many pixels.
REFUSED_DAMAGE = {400: "invalid_image", 413: "image_too_large"}


def post(http, url, data, content_type="image/jpeg", **params):
    return http.post(url + "/v1/detect", data=data, headers={"Content-Type": content_type}, params=params,
                     timeout=60)


def assert_error(response, status, code, mentions=""):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id"} and body["request_id"] == response.headers["X-Request-ID"]
    assert body["error"]["code"] == code
    assert mentions.lower() in body["error"]["message"].lower()
    assert "Traceback" not in response.text


@pytest.fixture(autouse=True)
def next_good_request_still_succeeds(gateway_url, http, hopper_jpeg):
    """After every bad request, a good one is served: the worker neither crashed nor got stuck."""
    yield
    response = post(http, gateway_url, hopper_jpeg)
    assert response.status_code == 200 and len(response.json()["detections"]) == 1


def test_empty_body(gateway_url, http):
    assert_error(post(http, gateway_url, b""), 400, "empty_body", "empty")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", "image/gif", ""])
def test_wrong_content_type(gateway_url, http, hopper_jpeg, content_type):
    assert_error(post(http, gateway_url, hopper_jpeg, content_type), 415, "unsupported_media_type", "Content-Type")


def test_multipart_without_image_field(gateway_url, http, hopper_jpeg):
    response = http.post(gateway_url + "/v1/detect", files={"picture": ("a.jpg", hopper_jpeg, "image/jpeg")})
    assert_error(response, 400, "missing_image", "'image'")


def test_truncated_jpeg(gateway_url, http, hopper_jpeg):
    assert_error(post(http, gateway_url, hopper_jpeg[: len(hopper_jpeg) // 2]), 400, "invalid_image", "truncated")


def test_random_bytes(gateway_url, http):
    noise = np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    assert_error(post(http, gateway_url, noise), 400, "invalid_image")


def test_corrupted_uploads_get_an_answer_each_and_the_workers_survive(gateway_stack, http, real_images):
    """Damaged images, as a flaky camera link delivers them: 200 or a JSON 4xx naming the problem, never a 5xx."""
    workers = sorted(children(gateway_stack.gunicorn.pid))
    originals = [(encode(image, ext), "image/" + ("jpeg" if ext == ".jpg" else ext[1:]))
                 for image in real_images.values() for ext in (".jpg", ".png", ".webp")]
    answered = {}
    for _, index, data in corrupted([encoded for encoded, _ in originals], 60, seed=2):
        response = post(http, gateway_stack.url, data, originals[index][1])
        if response.status_code != 200:
            assert response.status_code in REFUSED_DAMAGE, response.text
            assert_error(response, response.status_code, REFUSED_DAMAGE[response.status_code])
        answered[response.status_code] = answered.get(response.status_code, 0) + 1
    assert answered.get(200) and answered.get(400), answered  # the sample held both survivable and refused damage
    assert sorted(children(gateway_stack.gunicorn.pid)) == workers  # no worker died and was replaced


def test_an_invented_http_method_is_501(gateway_url, http, hopper_jpeg):
    response = http.request("QWERTY", gateway_url + "/v1/detect", data=hopper_jpeg,
                            headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert_error(response, 501, "method_not_implemented", "not an HTTP method")


def test_a_misspelt_parameter_is_refused_not_ignored(gateway_url, http, hopper_jpeg):
    assert_error(post(http, gateway_url, hopper_jpeg, confidense="0.99"), 400, "invalid_parameter", "'confidense'")


def test_a_second_image_on_the_single_endpoint_is_refused_not_dropped(gateway_url, http, hopper_jpeg):
    files = [("image", ("a.jpg", hopper_jpeg, "image/jpeg")), ("image", ("b.jpg", hopper_jpeg, "image/jpeg"))]
    response = http.post(gateway_url + "/v1/detect", files=files, timeout=60)
    assert_error(response, 422, "too_many_images", "/v1/detect/batch")


def test_a_form_over_its_part_limit_is_413_naming_that_limit_not_the_byte_limit(gateway_url, http):
    files = [("images", (f"{index}.jpg", b"x", "image/jpeg")) for index in range(1001)]
    response = http.post(gateway_url + "/v1/detect/batch", files=files, timeout=60)
    assert_error(response, 413, "payload_too_large", "at most 1000 parts")
    assert "exceeds the limit of" not in response.json()["error"]["message"]  # its 100 kB are far within 50 MiB


def test_oversized_body(gateway_url, http):
    assert_error(post(http, gateway_url, b"\xff" * (TEN_MIB + 1)), 413, "payload_too_large", str(TEN_MIB))


def _chunks(data: bytes, size: int = 256 * 1024):
    """A generator body: requests sends it with Transfer-Encoding: chunked and no Content-Length."""
    return (data[offset:offset + size] for offset in range(0, len(data), size))


def _padded_jpeg(jpeg: bytes, total: int) -> bytes:
    """The same whole JPEG grown to `total` bytes with zeros before its end-of-image marker (decoders skip them)."""
    return jpeg[:-2] + b"\x00" * (total - len(jpeg)) + jpeg[-2:]


def test_chunked_upload_over_the_limit_is_413_not_a_truncated_image(gateway_url, http, hopper_jpeg):
    """Without a Content-Length the size is known only by reading; a whole JPEG one byte too large is a 413."""
    too_large = _padded_jpeg(hopper_jpeg, TEN_MIB + 1)
    response = http.post(gateway_url + "/v1/detect", data=_chunks(too_large), headers={"Content-Type": "image/jpeg"},
                         timeout=60)
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert_error(response, 413, "payload_too_large", str(TEN_MIB))


def test_chunked_upload_of_exactly_the_limit_is_served(gateway_url, http, hopper_jpeg):
    response = http.post(gateway_url + "/v1/detect", data=_chunks(_padded_jpeg(hopper_jpeg, TEN_MIB)),
                         headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert response.status_code == 200, response.text
    assert len(response.json()["detections"]) == 1


def test_oversized_multipart_image(gateway_url, http):
    response = http.post(gateway_url + "/v1/detect", files={"image": ("big.jpg", b"\xff" * (TEN_MIB + 1))})
    assert_error(response, 413, "payload_too_large")


@pytest.fixture(scope="module")
def small_batch_gateway(gateway_stack, hopper_jpeg):
    """A one-worker gateway whose batch limit (GATEWAY_MAX_BATCH_BYTES) one hopper_jpeg fits and two do not."""
    limit = len(hopper_jpeg) * 3 // 2
    gateway = gateway_stack.start_another_gateway("small-batch-limit", {
        "GATEWAY_MAX_BATCH_BYTES": str(limit), "GATEWAY_WORKERS": "1"})
    yield gateway, limit
    gateway.stop()


@pytest.mark.parametrize("sent", ["content-length", "chunked"])
def test_a_batch_over_its_byte_limit_is_413_and_the_gateway_goes_on(small_batch_gateway, hopper_jpeg, sent):
    gateway, limit = small_batch_gateway
    body, content_type = encode_multipart_formdata([("images", (f"{i}.jpg", hopper_jpeg, "image/jpeg"))
                                                    for i in range(2)])
    assert len(body) > limit
    # a new connection for each: a body over the limit is not drained, so its connection is closed after the 413
    response = requests.post(gateway.url + "/v1/detect/batch", data=body if sent == "content-length" else
                             _chunks(body, 16 * 1024), headers={"Content-Type": content_type}, timeout=60)
    assert (response.request.headers.get("Transfer-Encoding") == "chunked") is (sent == "chunked")
    assert_error(response, 413, "payload_too_large", str(limit))
    one = requests.post(gateway.url + "/v1/detect/batch", files=[("images", ("0.jpg", hopper_jpeg, "image/jpeg"))],
                        timeout=60)
    assert one.status_code == 200, one.text
    assert len(one.json()["results"][0]["detections"]) == 1


def test_pixel_bomb_is_refused_without_decoding(gateway_url, http):
    response = post(http, gateway_url, png_bomb_header(50_000, 50_000), "image/png")
    assert_error(response, 413, "image_too_large", "50000x50000")  # the header's size: refused before decoding


@pytest.mark.parametrize("params, status, code, name", [
    ({"confidence": "-0.5"}, 422, "parameter_out_of_range", "confidence"),
    ({"confidence": "NaN"}, 422, "parameter_out_of_range", "confidence"),
    ({"iou": "1.01"}, 422, "parameter_out_of_range", "iou"),
    ({"max_faces": "0"}, 422, "parameter_out_of_range", "max_faces"),
    ({"max_faces": "-3"}, 422, "parameter_out_of_range", "max_faces"),
    ({"confidence": "high"}, 400, "invalid_parameter", "confidence"),
    ({"iou": "0.5.1"}, 400, "invalid_parameter", "iou"),
    ({"max_faces": "ten"}, 400, "invalid_parameter", "max_faces"),
])
def test_bad_parameters(gateway_url, http, hopper_jpeg, params, status, code, name):
    assert_error(post(http, gateway_url, hopper_jpeg, **params), status, code, name)


def test_batch_with_no_images_and_wrong_type(gateway_url, http, hopper_jpeg):
    assert_error(http.post(gateway_url + "/v1/detect/batch", files={"other": ("a", b"x")}), 400, "missing_image")
    malformed = b"--x\r\nContent-Type: image/jpeg\r\n\r\n" + hopper_jpeg  # no Content-Disposition, no closing
    for path in ("/v1/detect", "/v1/detect/batch"):
        response = http.post(gateway_url + path, data=malformed,
                             headers={"Content-Type": "multipart/form-data; boundary=x"})
        assert_error(response, 400, "missing_image", mentions="well-formed multipart")
    assert_error(http.post(gateway_url + "/v1/detect/batch", data=hopper_jpeg,
                           headers={"Content-Type": "image/jpeg"}), 415, "unsupported_media_type")


@pytest.mark.parametrize("method, path, content_type, status", [
    ("POST", "/v1/detect", "text/plain", 415),  # refused on its Content-Type, before the body is read
    ("POST", "/v1/detect/batch", "image/jpeg", 415),
    ("POST", "/v1/nothing-here", "image/jpeg", 404),
    ("PUT", "/v1/detect", "image/jpeg", 405),
])
def test_error_before_the_body_is_read_keeps_the_connection(gateway_url, hopper_jpeg, method, path,
                                                            content_type, status):
    """The next request on the same keep-alive connection is answered, not dropped.

    A raw http.client connection, not `requests`: urllib3 quietly reconnects when it finds its pooled
    connection closed, which hides the dropped connection from the caller. The body is larger than the
    64 KiB gunicorn discards by itself.
    """
    body = (hopper_jpeg * (1 + 300_000 // len(hopper_jpeg)))[:300_000]
    host, port = gateway_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type})
        refused = connection.getresponse()
        refused_body = refused.read()
        assert refused.status == status, refused_body
        assert json.loads(refused_body)["error"]["code"]
        if status == 405:  # HTTP requires a 405 to name the methods the resource has
            assert set(refused.getheader("Allow", "").split(", ")) >= {"POST", "OPTIONS"}
        connection.request("POST", "/v1/detect", body=hopper_jpeg, headers={"Content-Type": "image/jpeg"})
        answered = connection.getresponse()
        assert answered.status == 200 and len(json.loads(answered.read())["detections"]) == 1
    finally:
        connection.close()


# Image bytes as they would show in a log, raw or escaped: JPEG's start and JFIF header, PNG's signature and the
# binary width after its IHDR tag. (libpng's own diagnostics name the tag, "libpng error: IHDR: CRC error".)
IMAGE_BYTES_IN_TEXT = re.compile(r"\xff\xd8\xff|\\xff\\xd8|JFIF(\x00|\\x00)|\x89PNG|\\x89PNG|IHDR(\x00|\\x00)")


def test_logs_carry_no_image_bytes(gateway_stack, http, hopper_jpeg):
    for data, content_type in ((hopper_jpeg[: len(hopper_jpeg) // 2], "image/jpeg"), (hopper_jpeg[:4000], "image/png"),
                               (png_bomb_header(50_000, 50_000), "image/png"), (hopper_jpeg, "text/plain")):
        assert post(http, gateway_stack.url, data, content_type).status_code >= 400  # failures are what get logged
    log = (gateway_stack.log_dir / "gunicorn.log").read_bytes().decode("latin-1")  # every byte as itself
    assert not IMAGE_BYTES_IN_TEXT.search(log), IMAGE_BYTES_IN_TEXT.search(log)
    # the pattern finds what it looks for
    jpeg_start = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
    assert IMAGE_BYTES_IN_TEXT.search(repr(jpeg_start)) and IMAGE_BYTES_IN_TEXT.search(jpeg_start.decode("latin-1"))
    assert IMAGE_BYTES_IN_TEXT.search("\x89PNG\r\n") and not IMAGE_BYTES_IN_TEXT.search("libpng error: IHDR: CRC error")


@pytest.mark.parametrize("path", ["/v1/detect", "/v1/detect/batch"])
def test_a_bad_query_is_named_before_the_upload_is_looked_at(gateway_url, http, path):
    """Both endpoints judge the query first: a misspelt threshold sent with a body that is no image either is told
    about the threshold (and the gateway reads no upload for a request it refuses anyway)."""
    files = {"image" if path == "/v1/detect" else "images": ("notes.txt", b"not an image", "text/plain")}
    response = http.post(gateway_url + path, files=files, params={"confidense": "0.5"}, timeout=60)
    assert_error(response, 400, "invalid_parameter", "confidense")
