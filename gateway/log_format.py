"""How log lines look: one JSON object per line (GATEWAY_LOG_FORMAT=json) for log shippers, or text for people.

Imports nothing but the standard library: gunicorn's master loads it for its own log lines before any worker
exists.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT, JSON = "text", "json"
FORMATS = (TEXT, JSON)
# The ids logging_setup.RequestIdFilter puts on the gateway's records; "-" or absent where there are none.
ID_FIELDS = ("request_id", "trace_id", "span_id")


def iso_utc(epoch_s: float) -> str:
    """2026-11-22T10:15:02.123Z: the access log's and the JSON log lines' time stamps."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "pid", "message"}`, the request and trace ids where a record has them, and the
    traceback as `exception`: a multi-line traceback stays inside its line."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": iso_utc(record.created), "level": record.levelname, "logger": record.name,
                "pid": record.process, "message": record.getMessage()}
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value not in (None, "-"):
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, separators=(",", ":"))


def formatter(log_format: str, text: str) -> logging.Formatter:
    """The formatter of a handler of ours: JSON lines, or the `text` format (a logging format string)."""
    return JsonFormatter() if log_format == JSON else logging.Formatter(text)


def gunicorn_logconfig(log_format: str, log_level: str) -> dict:
    """gunicorn's `logconfig_dict`: its own lines (boot, worker exits, errors) in the same format as the app's.

    Any `logconfig_dict` turns gunicorn's own access log on, which would log every request a second time beside
    the app's JSON access log (gateway/access_log.py): its logger is silenced here.
    """
    if log_format != JSON:
        return {}
    return {
        "formatters": {"generic": {"()": f"{__name__}.JsonFormatter"}},
        "loggers": {
            "gunicorn.error": {"level": log_level.upper(), "handlers": ["error_console"], "propagate": False},
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
        },
    }
