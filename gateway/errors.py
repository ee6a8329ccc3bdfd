"""Typed gateway errors and the one table that turns them into HTTP statuses and JSON bodies."""
from __future__ import annotations

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import (BadRequest, ClientDisconnected, HTTPException, InternalServerError,
                                 MethodNotAllowed, NotFound, RequestEntityTooLarge)

from gateway.client_timeout import read_timed_out, stop_reading


class ApiError(Exception):
    """A failure the client is told about: a stable machine-readable `code` and a human message."""

    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ImageError(ApiError):
    """Something wrong with one uploaded image: in a batch it fails that image only."""


class RequestError(ApiError):
    """Something wrong with the request as a whole (its parameters, its shape)."""


class UpstreamFailure(ApiError):
    """Triton could not serve the request: every image of a batch would fail alike, so the batch fails."""


class EmptyBody(ImageError):
    code = "empty_body"


class UnsupportedMediaType(ImageError):
    code = "unsupported_media_type"


class InvalidImage(ImageError):
    code = "invalid_image"


class PayloadTooLarge(ImageError):
    code = "payload_too_large"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class InferenceRejected(ImageError):
    code = "inference_rejected"


class MissingImage(RequestError):
    code = "missing_image"


class InvalidParameter(RequestError):
    code = "invalid_parameter"


class ClientTimeout(RequestError):
    code = "client_timeout"


class ParameterOutOfRange(RequestError):
    code = "parameter_out_of_range"


class TooManyImages(RequestError):
    code = "too_many_images"


class MethodNotImplemented(RequestError):
    code = "method_not_implemented"


class TritonUnreachable(UpstreamFailure):
    code = "triton_unreachable"


class ModelNotReady(UpstreamFailure):
    code = "model_not_ready"


class TritonOverloaded(UpstreamFailure):
    code = "triton_overloaded"


class TritonTimeout(UpstreamFailure):
    code = "triton_timeout"


class UpstreamError(UpstreamFailure):
    code = "upstream_error"


# The one place a gateway error becomes an HTTP status.
HTTP_STATUS: dict[type[ApiError], int] = {
    EmptyBody: 400,
    MissingImage: 400,
    InvalidImage: 400,
    InvalidParameter: 400,
    UnsupportedMediaType: 415,
    ClientTimeout: 408,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    ParameterOutOfRange: 422,
    TooManyImages: 422,
    InferenceRejected: 422,
    TritonOverloaded: 429,
    MethodNotImplemented: 501,
    UpstreamError: 502,
    TritonUnreachable: 503,
    ModelNotReady: 503,
    TritonTimeout: 504,
}

# Statuses after which a retry is expected to succeed: they carry Retry-After.
RETRYABLE_STATUSES = frozenset({429, 503})


def status_of(error: ApiError) -> int:
    """HTTP status of a gateway error (500 for anything the table does not name)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def error_entry(error: ApiError) -> dict:
    """The `{"code", "message"}` object clients see, also used for one failed image of a batch."""
    return {"code": error.code, "message": error.message}


def error_kind(error: ApiError | None, status: int) -> str:
    """Whose failure an error answer is: client (the caller's input), upstream (Triton) or internal (a gateway bug)."""
    if isinstance(error, UpstreamFailure):
        return "upstream"
    if isinstance(error, (ImageError, RequestError)):
        return "client"
    return "client" if 400 <= status < 500 else "internal"


# werkzeug's own answers a client can cause anywhere: their codes are part of the API (and of the metrics) too.
WERKZEUG_CLIENT_ERRORS = (BadRequest, NotFound, MethodNotAllowed)


def http_error_code(error: HTTPException) -> str:
    """The API's code for one of werkzeug's HTTP errors: its name in snake case (`method_not_allowed`)."""
    return (error.name or "error").lower().replace(" ", "_")


def error_document(code: str, message: str, request_id: str | None) -> dict:
    """The JSON body of every error answer, in the app and in front of it."""
    return {"error": {"code": code, "message": message}, "request_id": request_id}


def error_response(status: int, code: str, message: str, error: ApiError | None = None):
    """A JSON error response in the one shape every endpoint uses; the code is kept for metrics and the access log."""
    g.error_code, g.error_kind = code, error_kind(error, status)
    response = jsonify(error_document(code, message, g.get("request_id")))
    response.status_code = status
    if status in RETRYABLE_STATUSES:
        response.headers["Retry-After"] = str(current_app.config["SETTINGS"].retry_after_s)
    return response


def _too_large_message() -> str:
    """Which limit a 413 from werkzeug hit: the body's size, or (a body within it) the multipart form's own limits."""
    limit, declared = request.max_content_length, request.content_length
    form_limits = f"at most {request.max_form_parts} parts and {request.max_form_memory_size} bytes per text field"
    if declared is not None and limit is not None and declared <= limit:
        return f"the multipart form exceeds its limits: {form_limits}"
    if declared is None and request.mimetype == "multipart/form-data":
        return f"the request exceeds a limit: {limit} bytes in all, {form_limits}"
    return f"request body exceeds the limit of {limit} bytes"


def register_error_handlers(app: Flask) -> None:
    """Make every failure, expected or not, a JSON body without internals (no stack traces, no image bytes)."""

    @app.errorhandler(ApiError)
    def _api_error(error: ApiError):
        return error_response(status_of(error), error.code, error.message, error)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(error: RequestEntityTooLarge):
        return error_response(413, PayloadTooLarge.code, _too_large_message())

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        response = error_response(error.code or 500, http_error_code(error), error.description or error.name)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:  # a 405 must say what is allowed
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(ClientDisconnected)
    def _body_stopped(error: ClientDisconnected):
        stop_reading(request.environ)
        if read_timed_out(error):
            timeout_s = current_app.config["SETTINGS"].client_timeout_s
            return _api_error(ClientTimeout(f"the request body stopped arriving: nothing came for {timeout_s:g} s"))
        return _http_error(error)

    # An exception no handler above knows escapes the view: Flask logs it with its traceback (through the
    # `gateway` logger, i.e. with the request id), hands it to teardown (where prometheus-flask-exporter
    # counts flask_http_request_exceptions_total and the server span records it) and answers with this.
    @app.errorhandler(InternalServerError)
    def _unexpected(error: InternalServerError):
        return error_response(500, ApiError.code, "internal error; see the gateway log for this request_id")
