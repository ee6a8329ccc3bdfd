"""The API's OpenAPI 3.1 document, kept as gateway/openapi.json beside the code it describes."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    """The parsed document (read once per process)."""
    return json.loads(files("gateway").joinpath("openapi.json").read_text(encoding="utf-8"))
