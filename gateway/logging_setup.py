"""Gateway log records go where gunicorn's go, at the configured level, tagged with the request and trace ids."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from flask import Flask, g, has_request_context

from gateway.log_format import formatter
from gateway.settings import Settings
from gateway.tracing import current_trace_ids

LOGGER_NAME = "gateway"
FORMAT = ("%(asctime)s [%(process)d] [%(levelname)s] %(name)s request_id=%(request_id)s trace_id=%(trace_id)s "
          "span_id=%(span_id)s: %(message)s")


NO_REQUEST = {"request_id": "-", "trace_id": "-", "span_id": "-"}  # extra= of a line that belongs to no request


class RequestIdFilter(logging.Filter):
    """Adds `request_id`, and the sampled span's `trace_id`/`span_id`, to every record ("-" where there is none).

    A client's id, or a trace found in Jaeger or through an exemplar, then finds its log lines and tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if hasattr(record, "request_id"):  # set by the caller (extra=): a line about no request of this one's
            return True
        record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        trace_id, span_id = current_trace_ids()
        record.trace_id, record.span_id = trace_id or "-", span_id or "-"
        return True


def register_logging(app: Flask, settings: Settings) -> None:
    """Configure the `gateway` logger once per process; messages never contain image bytes, only sizes and ids."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(settings.log_level.upper())
    if any(isinstance(f, RequestIdFilter) for h in logger.handlers for f in h.filters):
        return
    handler = logging.StreamHandler()  # stderr, which gunicorn sends to its error log
    handler.setFormatter(formatter(settings.log_format, FORMAT))
    handler.addFilter(RequestIdFilter())  # on the handler, so records of child loggers get it too
    logger.addHandler(handler)
    logger.propagate = False


class Throttled:
    """Logs a message at most once per `interval_s` for each key, saying how many it held back in between.

    For failures that arrive with every request (Triton down): one line per request would bury the log. What was
    held back is reported by the next failure after the interval, or by `settle` once the failures have stopped.
    """

    def __init__(self, logger: logging.Logger, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._lock = threading.Lock()
        # key -> (when last logged, how many held back since, the message and its arguments)
        self._last: dict[str, tuple[float, int, str, tuple]] = {}

    def warning(self, key: str, message: str, *args) -> None:
        now = self._clock()
        with self._lock:
            logged_at, held, _, _ = self._last.get(key, (None, 0, "", ()))
            if logged_at is not None and now - logged_at < self.interval_s:
                self._last[key] = (logged_at, held + 1, message, args)
                return
            self._last[key] = (now, 0, message, args)
        self._log(message, args, held, now - logged_at if held else 0.0)

    def settle(self) -> None:
        """Called on a success: each key whose interval is over logs what it held back and starts a new interval.

        Without it the size of an outage shorter than the interval would never reach the log. A key with nothing
        held back is forgotten, so the next failure is logged at once. Cheap when nothing failed: one look at an
        empty dict.
        """
        if not self._last:
            return
        now = self._clock()
        due = []
        with self._lock:
            for key, (logged_at, held, message, args) in list(self._last.items()):
                if now - logged_at < self.interval_s:
                    continue
                if held:  # still at most one line per interval: the next failure waits for this one's interval
                    self._last[key] = (now, 0, message, args)
                    due.append((held, now - logged_at, message, args))
                else:
                    del self._last[key]
        for held, over_s, message, args in due:  # said during a successful request: not tagged with its ids
            self.logger.warning(message + f" ({held} like it held back in the last {over_s:.0f} s)", *args,
                                extra=NO_REQUEST)

    def _log(self, message: str, args: tuple, held: int, over_s: float) -> None:
        if held:
            message += f" ({held} more like it in the last {over_s:.0f} s)"
        self.logger.warning(message, *args)
