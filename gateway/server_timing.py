"""Per-request stage durations, reported in the Server-Timing header and in JSON bodies."""
from __future__ import annotations

import time

from flask import Flask, g

HEADER = "Server-Timing"
STAGES = ("decode", "inference")


class Timings:
    """Milliseconds spent per stage of one request, summed when a stage runs more than once (batches)."""

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._stages: dict[str, float] = {}

    def add(self, stage: str, milliseconds: float) -> None:
        self._stages[stage] = self._stages.get(stage, 0.0) + milliseconds

    def total_ms(self) -> float:
        return (time.perf_counter() - self._start) * 1000.0

    def as_json(self) -> dict[str, float]:
        """`{"decode", "inference", "total"}` rounded to 0.01 ms, for response bodies."""
        out = {stage: round(self._stages.get(stage, 0.0), 2) for stage in STAGES}
        out.update({k: round(v, 2) for k, v in self._stages.items() if k not in out})
        out["total"] = round(self.total_ms(), 2)
        return out

    def header_value(self) -> str:
        """`decode;dur=1.2, inference;dur=20.5, total;dur=23.0` (only stages that ran, then total)."""
        parts = [f"{stage};dur={ms:.2f}" for stage, ms in self._stages.items()]
        parts.append(f"total;dur={self.total_ms():.2f}")
        return ", ".join(parts)


def current_timings() -> Timings:
    """The running request's Timings (a throwaway one outside a request, so callers never branch)."""
    timings = g.get("timings")
    if timings is None:
        timings = g.timings = Timings()
    return timings


def register_server_timing(app: Flask) -> None:
    """Start the clock before every request and attach Server-Timing to every response."""

    @app.before_request
    def _start_clock():
        g.timings = Timings()

    @app.after_request
    def _add_server_timing(response):
        response.headers[HEADER] = current_timings().header_value()
        return response
