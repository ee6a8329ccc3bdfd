"""The access log: one JSON object per request, in the shape `python -m gateway.log_analysis` reads.

    {"ts": "2026-11-22T10:15:02.123Z", "request_id": "...", "trace_id": "...", "span_id": "...",
     "route": "/v1/detect", "method": "POST", "status": 200, "duration_ms": 41.9,
     "image_width": 600, "image_height": 512, "faces": 1, "error_code": null}

`trace_id`/`span_id` name the request's server span when it was sampled (exported), else null; image size
and faces are null where the request had none (a batch reports its total faces and no single size).
Scrapes and probes are not logged. gunicorn's own access log is off (gateway/gunicorn.conf.py), so there is
exactly one line per request. No image bytes, file names or query values are ever written.
"""
from __future__ import annotations

import json
import logging
import sys
import time

from flask import Flask, g, request

from gateway.after_response import after_response
from gateway.log_format import iso_utc
from gateway.operational import OPERATIONAL_PATHS
from gateway.server_timing import current_timings
from gateway.settings import OFF, Settings
from gateway.tracing import current_trace_ids

LOGGER_NAME = "gateway.access"
KEYS = ("ts", "request_id", "trace_id", "span_id", "route", "method", "status", "duration_ms", "image_width",
        "image_height", "faces", "error_code")


def access_logger(settings: Settings) -> logging.Logger | None:
    """The process's access logger writing bare JSON lines to stdout or a file (None when turned off)."""
    if settings.access_log in ("", OFF):
        return None
    logger = logging.getLogger(LOGGER_NAME)
    if [getattr(handler, "destination", None) for handler in logger.handlers] != [settings.access_log]:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
        # Every worker appends whole lines (one write each) to the same file: O_APPEND keeps them intact.
        handler = (logging.StreamHandler(sys.stdout) if settings.access_log == "-"
                   else logging.FileHandler(settings.access_log, encoding="utf-8"))
        handler.destination = settings.access_log
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # not through the `gateway` logger's text format
    return logger


def access_record(status: int) -> dict:
    """The current request's line as a dict (called while its server span is still current)."""
    duration_ms = current_timings().total_ms()
    trace_id, span_id = current_trace_ids()
    rule = request.url_rule
    return {
        "ts": iso_utc(time.time() - duration_ms / 1000.0), "request_id": g.get("request_id"),
        "trace_id": trace_id, "span_id": span_id, "route": rule.rule if rule is not None else None,
        "method": request.method, "status": status, "duration_ms": round(duration_ms, 3),
        "image_width": g.get("image_width"), "image_height": g.get("image_height"), "faces": g.get("faces"),
        "error_code": g.get("error_code"),
    }


def register_access_log(app: Flask, settings: Settings) -> None:
    logger = access_logger(settings)
    if logger is None:
        return

    @app.after_request
    def _log_request(response):
        if request.path not in OPERATIONAL_PATHS:
            record = access_record(response.status_code)
            after_response(lambda: logger.info(json.dumps(record, separators=(",", ":"))))
        return response
