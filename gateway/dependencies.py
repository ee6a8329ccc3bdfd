"""Where the app keeps its settings and Triton detector, and how request handlers get them."""
from __future__ import annotations

from typing import Any, Mapping

from flask import Flask, current_app

from gateway.settings import Settings
from gateway.triton_client import TritonDetector, worker_detector

SETTINGS_KEY = "SETTINGS"
DETECTOR_KEY = "DETECTOR"  # set only by tests that replace Triton with a fake


def register_settings(app: Flask, config: Mapping[str, Any] | None) -> Settings:
    """Apply `config` to the Flask config; settings come from it (tests) or from the environment."""
    app.config.update(config or {})
    loaded = app.config.setdefault(SETTINGS_KEY, Settings.from_env())
    app.config.setdefault("MAX_CONTENT_LENGTH", loaded.max_body_bytes)  # views raise it for multipart/batch
    # The multipart form's own limits, set here rather than left to whichever werkzeug is installed.
    app.config.setdefault("MAX_FORM_PARTS", 1000)
    app.config.setdefault("MAX_FORM_MEMORY_SIZE", 500_000)  # bytes of one text field
    app.json.sort_keys = False  # keep response keys in the documented order
    return loaded


def settings() -> Settings:
    return current_app.config[SETTINGS_KEY]


def detector() -> TritonDetector:
    """The detector injected in the app config, else this worker process's real Triton client."""
    injected = current_app.config.get(DETECTOR_KEY)
    return injected if injected is not None else worker_detector(settings())
