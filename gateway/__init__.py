"""HTTP gateway in front of Triton's mask_detection ensemble: `gunicorn 'gateway:create_app()'`."""
from __future__ import annotations

from typing import Any, Mapping

from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the WSGI app; runs in each gunicorn worker after fork, so per-process state is made here, not at import.

    `config` overrides Flask config keys; `SETTINGS` (a Settings) replaces the environment's settings and
    `DETECTOR` replaces the Triton client (tests).
    """
    # Imported here, not at module level: gunicorn's master imports gateway.settings and must stay free of
    # cv2/gRPC/OpenTelemetry state that would be copied into every forked worker.
    from gateway.access_log import register_access_log
    from gateway.after_response import register_after_response
    from gateway.blueprints import register_blueprints
    from gateway.blueprints.metrics import register_metrics
    from gateway.dependencies import register_settings
    from gateway.errors import register_error_handlers
    from gateway.keepalive import register_body_drain
    from gateway.logging_setup import register_logging
    from gateway.methods import register_method_guard
    from gateway.request_id import register_request_id
    from gateway.server_timing import register_server_timing
    from gateway.tracing import register_tracing

    app = Flask(__name__)
    settings = register_settings(app, config)
    register_logging(app, settings)
    register_after_response(app)  # first: its after_request runs last and collects what the others deferred
    register_request_id(app)
    register_server_timing(app)
    register_access_log(app, settings)  # its after_request runs after the others (Flask runs them in reverse)
    register_error_handlers(app)
    register_body_drain(app, settings)
    register_tracing(app, settings)
    register_metrics(app, settings)
    register_blueprints(app)
    register_method_guard(app)  # outermost: around tracing and metrics too
    return app
