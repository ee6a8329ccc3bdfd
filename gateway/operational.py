"""The paths of scrapes and probes, which the metrics, the access log and tracing all leave out.

They would only measure the monitoring itself and drown the requests that matter.
"""
from __future__ import annotations

import re

OPERATIONAL_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


def operational_url_patterns() -> list[str]:
    """Regexes matching a full request URL whose path is exactly one of OPERATIONAL_PATHS (any query).

    OpenTelemetry searches its exclusion patterns anywhere in the URL, so they are anchored: a detection sent
    to a host named metrics.example or with `?tag=healthz` in its query is traced like any other.
    """
    return [rf"^[a-z][a-z0-9+.-]*://[^/]+{re.escape(path)}(\?|$)" for path in sorted(OPERATIONAL_PATHS)]
