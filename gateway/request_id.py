"""Give every request an id (the caller's when it is safe to echo) and return it as X-Request-ID."""
from __future__ import annotations

import re
import uuid

from flask import Flask, g, request

HEADER = "X-Request-ID"
# Echoed into headers, logs and JSON: keep it to a charset that cannot inject anything.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")


def request_id_from(header_value: str | None) -> str:
    """The caller's id when it is 1-128 safe characters, else a fresh random one."""
    if header_value and SAFE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


def register_request_id(app: Flask) -> None:
    """Assign `g.request_id` before every request and echo it on every response."""

    @app.before_request
    def _assign_request_id():
        g.request_id = request_id_from(request.headers.get(HEADER))

    @app.after_request
    def _echo_request_id(response):
        response.headers[HEADER] = g.get("request_id") or request_id_from(None)
        return response
