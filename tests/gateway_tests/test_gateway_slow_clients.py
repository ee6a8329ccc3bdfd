"""Clients that stall in the middle of a request are cut off after GATEWAY_CLIENT_TIMEOUT_S; the gateway keeps serving.

Without the read timeout gunicorn's threads wait on such clients forever: two stalled uploads on a one-worker,
two-thread gateway left /healthz unanswered for as long as they stayed connected.
"""
from __future__ import annotations

import json
import logging
import socket
import time

import pytest
import requests

from gateway.client_timeout import ReadTimeoutLogFilter, read_timed_out
from gateway.openapi import openapi_document
from gateway_helpers import children, documented_examples, json_shape, sample_sum, schema_validator, scraped

pytestmark = pytest.mark.triton

TIMEOUT_S = 2
THREADS = 2
STALLED_BODY = (b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n\xff\xd8\xff\xe0" + b"\x00" * 1000)
STALLED_MULTIPART = (b"POST /v1/detect/batch HTTP/1.1\r\nHost: gateway\r\n"
                     b"Content-Type: multipart/form-data; boundary=frontier\r\nContent-Length: 100000\r\n\r\n"
                     b"--frontier\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.jpg\"\r\n"
                     b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\xe0")
STALLED_HEADERS = b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Ty"


@pytest.fixture(scope="module")
def strict_gateway(gateway_stack):
    """A one-worker, two-thread gateway on the session's Triton that gives a silent client TIMEOUT_S per read."""
    gateway = gateway_stack.start_another_gateway("slow-clients", {
        "GATEWAY_CLIENT_TIMEOUT_S": str(TIMEOUT_S), "GATEWAY_WORKERS": "1", "GATEWAY_THREADS": str(THREADS)})
    yield gateway
    gateway.stop()


def _connect(port: int, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(first_bytes)
    return sock


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the test fails if it never does)."""
    sock.settimeout(30)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    return received


def _errors_counted(url: str, code: str) -> float:
    return sample_sum(scraped(url + "/metrics"), "gateway_errors_total", code=code)


def test_clients_stalled_mid_request_are_cut_off_and_the_gateway_keeps_serving(strict_gateway, hopper_jpeg):
    workers = set(children(strict_gateway.process.pid))
    counted_before = _errors_counted(strict_gateway.url, "client_timeout")
    # more stalled clients than the worker has threads, in each place a request can stall
    uploads = [_connect(strict_gateway.port, STALLED_BODY) for _ in range(THREADS)]
    multipart = _connect(strict_gateway.port, STALLED_MULTIPART)
    headers = _connect(strict_gateway.port, STALLED_HEADERS)

    assert requests.get(strict_gateway.url + "/healthz", timeout=60).status_code == 200
    detected = requests.post(strict_gateway.url + "/v1/detect", data=hopper_jpeg,
                             headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert detected.status_code == 200 and len(detected.json()["detections"]) == 1

    document = openapi_document()
    for path, sock in [("/v1/detect", upload) for upload in uploads] + [("/v1/detect/batch", multipart)]:
        answer = _until_closed(sock)  # the 408 is the last answer on that connection
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        error = json.loads(body)
        assert error["error"]["code"] == "client_timeout" and f"{TIMEOUT_S} s" in error["error"]["message"]
        schema_validator(document, "Error").validate(error)
        assert [json_shape(example) for example in documented_examples(document, path, "408")] == [json_shape(error)]
    assert _until_closed(headers) == b""  # no request was read, so there is nothing to answer

    assert set(children(strict_gateway.process.pid)) == workers  # the same worker served throughout
    assert _errors_counted(strict_gateway.url, "client_timeout") - counted_before == THREADS + 1
    log = strict_gateway.log_text()
    assert "Traceback" not in log
    assert f"a client sent nothing for {TIMEOUT_S} s in the middle of its request headers" in log


@pytest.mark.parametrize("request_head", [
    b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n",
    b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3e8\r\n",
], ids=["wrong_type", "unknown_route", "chunked_wrong_type"])
def test_a_body_refused_unread_that_stalls_keeps_its_answer(strict_gateway, request_head):
    """The answer was decided before the body was read (415, 404); discarding the rest of a body that then stalls
    must not turn it into a 500 counted as the gateway's own fault. The connection closes after the answer."""
    internal_before = _errors_counted(strict_gateway.url, "internal_error")
    sock = _connect(strict_gateway.port, request_head + b"x" * 1000)
    answer = _until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    expected = b"HTTP/1.1 404" if b"/nowhere" in request_head else b"HTTP/1.1 415"
    assert head.startswith(expected), answer[:300]
    assert b"x-request-id:" in head.lower()
    assert json.loads(body)["error"]["code"] in ("not_found", "unsupported_media_type")
    assert _errors_counted(strict_gateway.url, "internal_error") == internal_before
    assert requests.get(strict_gateway.url + "/healthz", timeout=60).status_code == 200


def test_a_body_that_ends_before_its_content_length_is_a_bad_request(strict_gateway, hopper_jpeg):
    """A whole JPEG announced as 5000 bytes longer, then the client's side shut: not a detection on what came."""
    sock = _connect(strict_gateway.port, b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                    + f"Content-Length: {len(hopper_jpeg) + 5000}\r\n\r\n".encode() + hopper_jpeg)
    sock.shutdown(socket.SHUT_WR)
    head, _, body = _until_closed(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request"
    assert error["message"] == (f"the body ended after {len(hopper_jpeg)} of the {len(hopper_jpeg) + 5000} bytes "
                                "its Content-Length announced")


def test_an_upload_that_keeps_arriving_is_not_cut_off(strict_gateway, hopper_jpeg):
    """The timeout is per read, not per request: a slow upload longer than TIMEOUT_S in all is served."""
    sock = _connect(strict_gateway.port, b"POST /v1/detect HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/jpeg\r\n"
                                        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(hopper_jpeg))
    pieces = 8
    step = -(-len(hopper_jpeg) // pieces)
    for offset in range(0, len(hopper_jpeg), step):  # 8 pauses of TIMEOUT_S / 5: longer than TIMEOUT_S in all
        time.sleep(TIMEOUT_S / 5)
        sock.sendall(hopper_jpeg[offset:offset + step])
    answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b'"label":' in answer


def test_read_timed_out_follows_the_chain_of_causes():
    try:
        try:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        except OSError:
            raise ValueError("werkzeug-style wrapper")  # noqa: B904 - implicit context, as werkzeug raises it
    except ValueError as wrapped:
        assert read_timed_out(wrapped)
    assert read_timed_out(TimeoutError())
    assert not read_timed_out(ConnectionResetError())
    assert not read_timed_out(ValueError("truncated body"))


def test_the_log_filter_turns_only_read_timeouts_into_one_warning_line():
    log_filter = ReadTimeoutLogFilter(2.5)

    def record(error: BaseException) -> logging.LogRecord:
        return logging.LogRecord("gunicorn.error", logging.ERROR, __file__, 1, "Socket error processing request.",
                                 None, (type(error), error, None))

    stalled = record(BlockingIOError(11, "Resource temporarily unavailable"))
    assert log_filter.filter(stalled)
    assert stalled.levelname == "WARNING" and stalled.exc_info is None
    assert stalled.getMessage() == "a client sent nothing for 2.5 s in the middle of its request headers; closed"
    other = record(ConnectionAbortedError())
    assert log_filter.filter(other)
    assert other.levelname == "ERROR" and other.exc_info is not None
