"""A small self-contained web page (no external assets) to try the API from a browser."""
from __future__ import annotations

from flask import Blueprint, render_template

from gateway.dependencies import settings

bp = Blueprint("ui", __name__, template_folder="../templates")


@bp.get("/")
def index():
    """Upload an image, see the boxes drawn on it and the JSON the API returned."""
    config = settings()
    return render_template("index.html", model_name=config.model_name, max_body_mb=config.max_body_bytes / 2**20)
