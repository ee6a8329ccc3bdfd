"""Work the caller need not wait for (its access-log line, its metric updates), run once its answer is written.

gunicorn writes its own access log the same way: after the response, from the WSGI `close()` that every server
calls once the body is out, also when writing it failed.
"""
from __future__ import annotations

import logging
from typing import Callable

from flask import Flask, Response, g

log = logging.getLogger(__name__)


def after_response(work: Callable[[], None]) -> None:
    """Run `work` (bound to the values it needs: the request is gone by then) after this request's answer is sent."""
    g.setdefault("after_response", []).append(work)


def _run(work: Callable[[], None]) -> Callable[[], None]:
    def guarded() -> None:
        try:
            work()
        except Exception:  # one failing piece of bookkeeping must not skip the others or reach the server
            log.exception("work after the response failed")
    return guarded


def register_after_response(app: Flask) -> None:
    """Register first: Flask runs after_request hooks in reverse, so this one sees the work all the others deferred."""

    @app.after_request
    def _defer(response: Response) -> Response:
        for work in g.pop("after_response", ()):
            response.call_on_close(_run(work))
        return response
