"""Triton's per-model statistics (`GET /v2/models/stats`), differenced around a measurement.

perf_analyzer's CSV has the server-side breakdown of the model it drives only; the deltas of
every model's counters also cover an ensemble's composing models and the classifier that
postprocess calls by BLS.
"""
from __future__ import annotations

import json
import urllib.request

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_stats(http_url: str, timeout: float = 10) -> dict[str, dict]:
    """name -> that model's statistics (all versions summed are not needed: one version per model here)."""
    with urllib.request.urlopen(f"{http_url}/v2/models/stats", timeout=timeout) as response:
        document = json.loads(response.read())
    return {entry["name"]: entry for entry in document.get("model_stats", [])}


def _counter(entry: dict, phase: str) -> tuple[int, int]:
    stats = entry.get("inference_stats", {}).get(phase, {})
    return int(stats.get("count", 0)), int(stats.get("ns", 0))


def stats_delta(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per model that served requests in between: counts, failures, mean batch size and mean µs per phase."""
    delta = {}
    for name, entry in after.items():
        previous = before.get(name, {})
        success, success_ns = (a - b for a, b in zip(_counter(entry, "success"), _counter(previous, "success")))
        failed, _ = (a - b for a, b in zip(_counter(entry, "fail"), _counter(previous, "fail")))
        if success == 0 and failed == 0:
            continue
        inferences = int(entry.get("inference_count", 0)) - int(previous.get("inference_count", 0))
        executions = int(entry.get("execution_count", 0)) - int(previous.get("execution_count", 0))
        model = {
            "requests": success,
            "failed_requests": failed,
            "inferences": inferences,
            "executions": executions,
            "mean_batch_size": round(inferences / executions, 3) if executions else None,
            "request_us": round(success_ns / success / 1e3, 1) if success else None,
        }
        for phase in PHASES:
            count, ns = (a - b for a, b in zip(_counter(entry, phase), _counter(previous, phase)))
            model[f"{phase}_us"] = round(ns / count / 1e3, 1) if count else None
        delta[name] = model
    return delta


def server_version(http_url: str, timeout: float = 10) -> str | None:
    """tritonserver's version from its metadata endpoint (`GET /v2`), None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{http_url}/v2", timeout=timeout) as response:
            return json.loads(response.read()).get("version")
    except (OSError, ValueError):
        return None
