"""The detection API: one image (raw body or multipart), a batch of images, and its OpenAPI document."""
from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from flask import Blueprint, Response, g, jsonify, request
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import ClientDisconnected

from gateway.after_response import after_response
from gateway.annotate import draw_detections, encode_jpeg
from gateway.blueprints.metrics import service_metrics
from gateway.dependencies import detector, settings
from gateway.detection import ImageResult, detect_in_image
from gateway.errors import (EmptyBody, ImageError, MissingImage, PayloadTooLarge, TooManyImages,
                            UnsupportedMediaType, error_entry)
from gateway.openapi import openapi_document
from gateway.params import DetectParams, parse_detect_params
from gateway.server_timing import current_timings
from gateway.tracing import current_trace_ids, set_server_span_attributes, stage_span

bp = Blueprint("api", __name__)

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
MULTIPART = "multipart/form-data"
# Multipart parts are often unlabelled or generic; their bytes are checked by decoding anyway.
GENERIC_PART_TYPES = ("", "application/octet-stream")
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around a maximum-size image
SINGLE_FIELD = "image"
BATCH_FIELD = "images"
DETECTION_ENDPOINTS = frozenset({"api.detect", "api.detect_batch"})  # observed as stage="total"


def _unsupported(mimetype: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"Content-Type {mimetype or '(none)'!s} is not accepted; send the image as the raw body with "
        f"Content-Type {', '.join(IMAGE_TYPES)}, or as multipart/form-data field '{SINGLE_FIELD}'")


def _read_part(part: FileStorage, max_bytes: int) -> bytes:
    """The bytes of one multipart file, checked for a usable type and the per-image size limit."""
    if part.mimetype not in IMAGE_TYPES + GENERIC_PART_TYPES:
        raise UnsupportedMediaType(f"part {part.filename or part.name!r} has type {part.mimetype!r}; "
                                   f"expected one of {', '.join(IMAGE_TYPES)}")
    data = part.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image {part.filename or part.name!r} exceeds the limit of {max_bytes} bytes")
    if not data:
        raise EmptyBody(f"image {part.filename or part.name!r} is empty")
    return data


def _read_unsized_body(max_bytes: int) -> bytes:
    """A body sent without Content-Length (chunked), read to one byte past the limit to tell "too large" from "whole".

    werkzeug's own limit stops reading at `max_content_length` bytes and hands over what it has: an upload cut
    short that way would be judged as a truncated image instead of a 413.
    """
    request.max_content_length = max_bytes + 1
    stream, chunks, size = request.stream, [], 0
    while size <= max_bytes:
        chunk = stream.read(max_bytes + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > max_bytes:
        raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
    return b"".join(chunks)


def _missing(field: str) -> MissingImage:
    """No such file field; werkzeug's form parser reads a malformed multipart body as one without fields."""
    return MissingImage(f"the multipart body has no file field '{field}' (or is not well-formed multipart/form-data)")


def _single_upload() -> bytes:
    """The one image of /v1/detect: the raw body, or the multipart field `image`."""
    max_bytes = settings().max_body_bytes
    if request.mimetype == MULTIPART:
        request.max_content_length = max_bytes + MULTIPART_OVERHEAD_BYTES
        parts = request.files.getlist(SINGLE_FIELD)
        if not parts:
            raise _missing(SINGLE_FIELD)
        if len(parts) > 1:
            raise TooManyImages(f"{len(parts)} file fields '{SINGLE_FIELD}' sent; /v1/detect takes one image "
                                f"(several go to /v1/detect/batch as '{BATCH_FIELD}')")
        return _read_part(parts[0], max_bytes)
    if request.mimetype not in IMAGE_TYPES:
        raise _unsupported(request.mimetype)
    if request.content_length is None:
        data = _read_unsized_body(max_bytes)
    else:
        request.max_content_length = max_bytes
        data = request.get_data(cache=False)
        if len(data) < request.content_length:  # the client shut its side early; the server hands over what came
            raise ClientDisconnected(f"the body ended after {len(data)} of the {request.content_length} bytes its "
                                     "Content-Length announced")
    if not data:
        raise EmptyBody("the request body is empty; send the image bytes")
    return data


def _wants_jpeg() -> bool:
    """`Accept: image/jpeg` asks for the annotated picture instead of JSON (JSON wins ties such as */*)."""
    return request.accept_mimetypes.best_match(["application/json", "image/jpeg"]) == "image/jpeg"


def _model_json(version: str | None) -> dict:
    return {"name": settings().model_name, "version": version}


# Stages of detect_in_image -> their names in Server-Timing
SERVER_TIMING_NAMES = {"decode": "decode", "triton": "inference"}


def _record_stages(stages: dict[str, float]) -> None:
    """The stages one image went through (a failed Triton call's too) into Server-Timing and the metrics."""
    timings = current_timings()
    for stage, milliseconds in stages.items():
        timings.add(SERVER_TIMING_NAMES[stage], milliseconds)
        _observe_stage_after_answer(stage, milliseconds / 1000.0)


def _record(result: ImageResult) -> None:
    """One processed image into the metrics and the access log (its stages go through _record_stages)."""
    # only what the metrics need: the result may hold a full-size frame, not to be kept while the answer is sent
    metrics, size, labels = service_metrics(), (result.width, result.height), result.labels
    label_scores, transport, inline_reason = result.label_scores, result.transport, result.inline_reason
    after_response(lambda: metrics.observe_image(*size, labels, label_scores, transport, inline_reason))
    g.faces = g.get("faces", 0) + len(result.labels)


def _observe_stage_after_answer(stage: str, seconds: float) -> None:
    """One stage's duration into the metrics once the answer is out, with this request's trace id as exemplar."""
    metrics, trace_id = service_metrics(), current_trace_ids()[0]
    after_response(lambda: metrics.observe_stage(stage, seconds, trace_id))


@contextmanager
def _encoding(response_format: str):
    """Time and trace the encoding of the answer (JSON or annotated JPEG) as stage `encode`."""
    start = time.perf_counter()
    with stage_span("encode", **{"gateway.response.format": response_format}) as span:
        yield span
    seconds = time.perf_counter() - start
    current_timings().add("encode", seconds * 1000.0)
    _observe_stage_after_answer("encode", seconds)


@bp.after_request
def _observe_total(response):
    """The whole detection request as the caller waited for it, as stage `total` (the latency SLO's metric).

    Answers and the service's own failures (Triton's 429 and 5xx included) count; the caller's mistakes do not:
    a stalled upload's 408 comes after GATEWAY_CLIENT_TIMEOUT_S, and a few such cameras would breach the SLO of a
    healthy service.
    """
    if request.endpoint in DETECTION_ENDPOINTS:
        set_server_span_attributes(**{"gateway.request_id": g.get("request_id"), "gateway.faces": g.get("faces")})
        if g.get("error_kind") != "client":  # errors.error_kind: client, upstream or internal
            _observe_stage_after_answer("total", current_timings().total_ms() / 1000.0)
    return response


@bp.post("/v1/detect")
def detect():
    """Faces with mask / no-mask labels in one image, as JSON or (Accept: image/jpeg) an annotated JPEG."""
    params = parse_detect_params(request.args)  # first, as the batch: a bad query costs no upload
    data = _single_upload()
    wants_jpeg = _wants_jpeg()
    stages = {}
    try:
        result = detect_in_image(data, params, settings(), detector(), keep_pixels=wants_jpeg, stages=stages)
    finally:
        _record_stages(stages)
    _record(result)
    g.image_width, g.image_height = result.width, result.height
    set_server_span_attributes(**{"image.width": result.width, "image.height": result.height})
    if wants_jpeg:
        with _encoding("jpeg") as span:
            annotated = draw_detections(result.pixels, result.boxes, result.labels, result.label_scores)
            body = encode_jpeg(annotated)
            span.set_attribute("gateway.response.bytes", len(body))
        return Response(body, mimetype="image/jpeg")
    with _encoding("json") as span:
        response = jsonify({
            "request_id": g.request_id,
            "image": {"width": result.width, "height": result.height},
            "model": _model_json(result.model_version),
            "detections": result.detections_json(),
            "timing_ms": current_timings().as_json(),
        })
        span.set_attribute("gateway.response.bytes", response.content_length or 0)
    return response


def _batch_entry(index: int, part: FileStorage, params: DetectParams, stages: dict[str, float]):
    """Read one image of a batch and return the work to run it: image errors become that image's entry.

    The work fills `stages` (detect_in_image's) in a pool thread; the request's thread records them.
    """
    config, triton = settings(), detector()
    entry = {"index": index, "filename": part.filename or None}
    try:
        data = _read_part(part, config.max_body_bytes)
    except ImageError as error:
        failed = {**entry, "error": error_entry(error)}
        return lambda: (failed, None)

    def run():
        try:
            result = detect_in_image(data, params, config, triton, stages=stages)
        except ImageError as error:
            return {**entry, "error": error_entry(error)}, None
        return {**entry, "image": {"width": result.width, "height": result.height},
                "detections": result.detections_json(),
                "timing_ms": {"decode": round(result.decode_ms, 2),
                              "inference": round(result.inference_ms, 2)}}, result

    context = contextvars.copy_context()  # the request's trace context, for the Triton call in a pool thread
    return lambda: context.run(run)


@bp.post("/v1/detect/batch")
def detect_batch():
    """Several images (multipart field `images`, repeated); results in request order, one entry per image."""
    config = settings()
    request.max_content_length = config.max_batch_bytes
    if request.mimetype != MULTIPART:
        raise UnsupportedMediaType(f"Content-Type {request.mimetype or '(none)'} is not accepted; send "
                                   f"multipart/form-data with one or more file fields '{BATCH_FIELD}'")
    params = parse_detect_params(request.args)
    parts = request.files.getlist(BATCH_FIELD)
    if not parts:
        raise _missing(BATCH_FIELD)
    if len(parts) > config.max_batch_images:
        raise TooManyImages(f"{len(parts)} images sent; at most {config.max_batch_images} per batch")
    stages = [{} for _ in parts]
    jobs = [_batch_entry(index, part, params, stages[index]) for index, part in enumerate(parts)]
    # Images go to Triton concurrently so its dynamic batcher can group them; Triton-wide failures propagate.
    try:
        with ThreadPoolExecutor(max_workers=min(len(jobs), config.batch_concurrency)) as pool:
            outcomes = list(pool.map(lambda job: job(), jobs))
    finally:  # the pool has finished every image here, also when one failed for the whole batch
        for image_stages in stages:
            _record_stages(image_stages)
    results = [result for _, result in outcomes if result is not None]
    for result in results:
        _record(result)
    metrics = service_metrics()
    for entry, _ in outcomes:
        if "error" in entry:  # a failed image of an answered batch: an image error, the caller's
            metrics.count_error(entry["error"]["code"], "client")
    g.faces = g.get("faces", 0)
    with _encoding("json") as span:
        response = jsonify({
            "request_id": g.request_id,
            "model": _model_json(results[0].model_version if results else None),
            "results": [entry for entry, _ in outcomes],
            "timing_ms": current_timings().as_json(),
        })
        span.set_attribute("gateway.response.bytes", response.content_length or 0)
    return response


@bp.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 description of this API."""
    return openapi_document()
