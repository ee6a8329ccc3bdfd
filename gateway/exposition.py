"""The merged metrics page: every gunicorn worker's families (or one registry's), with exemplars, plus Triton's.

Flask-free, so the same page is served on the API port (gateway/blueprints/metrics.py) and, where
GATEWAY_METRICS_PORT is set, by a process of its own (gateway/metrics_server.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from gateway import triton_metrics
from gateway.exemplars import ExemplarStore
from gateway.settings import Settings

log = logging.getLogger(__name__)

OPENMETRICS = "application/openmetrics-text"
EOF_LINE = "# EOF\n"


class _Families:
    """A fixed list of metric families in the shape prometheus_client's encoders read (a `collect()`)."""

    def __init__(self, families):
        self._families = families

    def collect(self):
        return iter(self._families)


def _names_of(families) -> set[str]:
    names = set()
    for family in families:
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        names.update(sample.name for sample in family.samples)
    return names


@dataclass
class Exposition:
    """What one scrape answers; `registry` is None in multiprocess mode (the values live in files)."""

    settings: Settings
    registry: CollectorRegistry | None
    exemplars: ExemplarStore
    triton_was_up: bool | None = None  # to log a change of Triton's metrics reachability once, not every scrape

    def render(self, accept: str | None, names: list[str] | None = None) -> tuple[str, str]:
        """(body, content type) in the format the scraper asked for (OpenMetrics carries the exemplars)."""
        families = self._gateway_families()
        triton = self._triton_part(families) if self.settings.triton_metrics_merged else []
        if names:
            wanted = set(names)
            families = [family for family in families if _names_of([family]) & wanted]
            triton = [family for family in triton if family.names() & wanted]
        triton = triton_metrics.without_names(triton, _names_of(families))
        encoder, content_type = choose_encoder(accept or "")
        body = encoder(_Families(families)).decode("utf-8")
        if content_type.startswith(OPENMETRICS):
            body = body[:-len(EOF_LINE)] if body.endswith(EOF_LINE) else body
            body += triton_metrics.render_openmetrics(triton) + EOF_LINE
        else:
            body += triton_metrics.render_text(triton)
        return body, content_type

    def _gateway_families(self) -> list:
        if self.registry is None:
            from prometheus_client.multiprocess import MultiProcessCollector

            families = list(MultiProcessCollector(None, path=self.settings.prometheus_multiproc_dir).collect())
        else:
            families = list(self.registry.collect())
        return self.exemplars.attach(families)

    def _triton_part(self, families: list) -> list[triton_metrics.Family]:
        """Fetch Triton's families and add `gateway_triton_metrics_up` to the gateway's."""
        url = self.settings.triton_metrics_url
        scrape = triton_metrics.fetch(url, self.settings.triton_metrics_timeout_s)
        families.append(GaugeMetricFamily("gateway_triton_metrics_up",
                                          "1 when Triton's metrics were fetched and merged into this scrape, else 0",
                                          value=1.0 if scrape.ok else 0.0))
        if scrape.ok != self.triton_was_up:
            if scrape.ok:
                log.info("Triton metrics at %s merged into /metrics", url)
            else:
                log.warning("Triton metrics at %s unavailable (%s); /metrics carries the gateway's only", url,
                            scrape.error)
            self.triton_was_up = scrape.ok
        return scrape.families
