"""One blueprint per concern: the detection API, health probes, Prometheus metrics and the web page."""
from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    """Mount every route of the gateway."""
    from gateway.blueprints import api, health, metrics, ui

    for blueprint in (api.bp, health.bp, metrics.bp, ui.bp):
        app.register_blueprint(blueprint)
