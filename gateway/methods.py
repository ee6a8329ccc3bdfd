"""Requests whose method HTTP does not define are answered 501 before the app sees them.

prometheus-flask-exporter labels every request it measures with its method: left to Flask (a 405), each
invented method would become a new series in every scrape, as many as a client cares to send. They are
counted in the one fixed series `gateway_errors_total{code="method_not_implemented"}` instead.
"""
from __future__ import annotations

import json
from http import HTTPStatus

from flask import Flask

from gateway.blueprints.metrics import app_service_metrics
from gateway.errors import MethodNotImplemented, error_document, error_kind, status_of
from gateway.request_id import HEADER, request_id_from

# RFC 9110's methods and PATCH (RFC 5789): a known method the route lacks is still Flask's 405.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def register_method_guard(app: Flask) -> None:
    """Wrap the whole WSGI app (tracing and metrics included) so an unknown method is refused outside them."""
    inner = app.wsgi_app
    metrics = app_service_metrics(app)

    def refuse_unknown_methods(environ, start_response):
        if environ.get("REQUEST_METHOD") in KNOWN_METHODS:
            return inner(environ, start_response)
        error = MethodNotImplemented("the request method is not an HTTP method; this API uses GET, HEAD, POST "
                                     "and OPTIONS")
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        body = json.dumps(error_document(error.code, error.message, request_id)).encode()
        status = status_of(error)
        metrics.count_error(error.code, error_kind(error, status))
        start_response(f"{status} {HTTPStatus(status).phrase}", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), (HEADER, request_id)])
        return [body]

    app.wsgi_app = refuse_unknown_methods
