"""Work the caller need not wait for (its access-log line, its metric updates), run once its answer is written.

gunicorn writes its own access log at the same point: after the body, next to the WSGI `close()` that every
server calls once the body is out, also when writing it failed. That `close()` runs the work here.
"""
from __future__ import annotations

import logging
from typing import Callable

from flask import Flask, Response, g

log = logging.getLogger(__name__)
PENDING_KEY = "after_response"  # in flask.g: the work queued by this request


def after_response(work: Callable[[], None]) -> None:
    """Run `work` (bound to the values it needs: the request is gone by then) after this request's answer is sent."""
    g.setdefault(PENDING_KEY, []).append(_guarded(work, g.get("request_id")))


def _guarded(work: Callable[[], None], request_id: str | None) -> Callable[[], None]:
    def run() -> None:
        try:
            work()
        except Exception:  # one failing piece of bookkeeping must not skip the others or reach the server
            log.exception("work after the answer to request %s failed", request_id)
    return run


def register_after_response(app: Flask) -> None:
    """Register first: Flask runs after_request hooks in reverse, so this one sees the work all the others deferred."""

    @app.after_request
    def _defer(response: Response) -> Response:
        # a passthrough response (send_file) is handed to the server without the wrapper whose close() runs these
        if not response.direct_passthrough:
            for work in g.pop(PENDING_KEY, ()):
                response.call_on_close(work)
        return response

    @app.teardown_request
    def _run_leftovers(_exception) -> None:
        """Work no response took (a passthrough one, or _defer never reached): run it now rather than lose it."""
        for work in g.pop(PENDING_KEY, ()):
            work()
