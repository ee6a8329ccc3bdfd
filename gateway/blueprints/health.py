"""Liveness (the process answers) and readiness (Triton answers and the model is loaded) probes."""
from __future__ import annotations

from flask import Blueprint, jsonify

from gateway.dependencies import detector, settings
from gateway.errors import ModelNotReady, TritonUnreachable

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """200 while this worker can answer at all; never touches Triton, so a Triton outage does not restart us."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """200 when Triton is reachable and the model is ready, else 503 with the reason."""
    readiness = detector().readiness()
    if not readiness.ready:
        raise (ModelNotReady if readiness.reachable else TritonUnreachable)(readiness.reason)
    return jsonify({"status": "ready", "model": settings().model_name, "triton": settings().triton_url})
