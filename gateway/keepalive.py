"""Read what a request left of its body before answering, so its keep-alive connection can carry the next one.

An error answered before the view read the upload (a wrong Content-Type, an unknown route) leaves the body on
the socket. gunicorn then discards at most 64 KiB of it and closes the connection, after having told the client
`Connection: keep-alive`: the client's next request on that connection fails. Bodies within the upload limit
are therefore read here; a larger one (a 413) still ends its connection.
"""
from __future__ import annotations

from flask import Flask, request

from gateway.client_timeout import stop_reading
from gateway.settings import Settings

CHUNK_BYTES = 64 * 1024


def drain_request_body(limit_bytes: int) -> None:
    """Discard the unread rest of this request's body, unless it is (or turns out) larger than `limit_bytes`.

    A body that stalls past the read timeout or breaks off (a chunk cut short) ends the draining, not the answer
    already decided: the connection closes after it instead of carrying another request.
    """
    declared = request.content_length
    if declared is not None and declared > limit_bytes:
        return
    stream, drained = request.environ["wsgi.input"], 0
    try:
        while drained <= limit_bytes:
            chunk = stream.read(CHUNK_BYTES)
            if not chunk:
                return
            drained += len(chunk)
    except Exception:  # noqa: BLE001 - the server's read errors (timeouts, gunicorn's NoMoreData...) share no base
        stop_reading(request.environ)


def register_body_drain(app: Flask, settings: Settings) -> None:
    """Drain every request's unread body (up to the largest upload accepted) before its response is sent."""
    limit_bytes = max(settings.max_body_bytes, settings.max_batch_bytes)

    @app.after_request
    def _drain_unread_body(response):
        if request.content_length or request.headers.get("Transfer-Encoding"):
            drain_request_body(limit_bytes)
        return response
