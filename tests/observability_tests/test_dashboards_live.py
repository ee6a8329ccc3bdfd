"""Every Grafana panel, evaluated against a real Prometheus that scrapes the real gateway (2 gunicorn workers)
in front of the real tritonserver, with the compose recording and alerting rules loaded, after a short
bounded load with good and bad requests: each expression parses and returns data, except the panels marked
GPU-only (compose/dashboards.py GPU_ONLY_PANELS) on a machine where Triton sees no GPU."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import requests

from prometheus_client.parser import text_string_to_metric_families as parse_text

from observed import load_compose_module, mixed_load

dashboards = load_compose_module("dashboards")
promserver = load_compose_module("promserver")

SCRAPE_INTERVAL = "1s"
RATE_INTERVAL = "1m"
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def prometheus(observed_stack):
    if promserver.prometheus_binary() is None:
        pytest.fail("the `prometheus` binary is required (Debian package `prometheus`, see the Makefile)")
    rules = sorted(dashboards.RULES_DIR.glob("*.yml"))
    with promserver.PrometheusServer(scrape_targets={"gateway": f"127.0.0.1:{observed_stack.metrics_port}"},
                                     rule_files=rules, scrape_interval=SCRAPE_INTERVAL,
                                     evaluation_interval=SCRAPE_INTERVAL,
                                     extra_args=["--enable-feature=exemplar-storage"]) as server:
        server.wait_for_target_up("gateway")
        yield server


def _gateway_counts(url: str) -> tuple[Counter, Counter]:
    """The gateway's own request counts by status and error counts by code, from its /metrics (all workers)."""
    statuses, errors = Counter(), Counter()
    for family in parse_text(requests.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "flask_http_request_total":
                statuses[int(sample.labels["status"])] += sample.value
            elif sample.name == "gateway_errors_total":
                errors[sample.labels["code"]] += sample.value
    return statuses, errors


def _prometheus_counts(prometheus) -> tuple[Counter, Counter]:
    """The same counts as Prometheus last scraped them."""
    statuses = Counter({int(row["metric"]["status"]): float(row["value"][1]) for row in prometheus.query(
        'sum by (status) (flask_http_request_total{job="gateway"})')["result"]})
    errors = Counter({row["metric"]["code"]: float(row["value"][1]) for row in prometheus.query(
        'sum by (code) (gateway_errors_total{job="gateway"})')["result"]})
    return statuses, errors


@pytest.fixture(scope="module")
def loaded(prometheus, observed_stack, real_images):
    """The bounded load and the counts from before it; returns once Prometheus has scraped all of it and the
    recording rules have evaluated it."""
    before = _gateway_counts(observed_stack.url)
    result = mixed_load(observed_stack.url, real_images)
    assert result.succeeded and result.requests - result.succeeded >= 10, result.statuses
    after = _gateway_counts(observed_stack.url)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        recorded = prometheus.query('job:gateway_request_duration_seconds:p95_5m{job="gateway"}')["result"]
        if _prometheus_counts(prometheus) == after and recorded and float(recorded[0]["value"][1]) > 0:
            return result, before
        time.sleep(0.5)
    raise AssertionError(f"Prometheus did not catch up with the load: {_prometheus_counts(prometheus)} vs {after}")


def _has_data(result: dict) -> bool:
    return bool(result["result"]) if result["resultType"] in ("vector", "matrix") else True


def test_every_panel_expression_returns_data_except_gpu_only_panels(prometheus, loaded, observed_dir):
    gpu_present = _has_data(prometheus.query("nv_gpu_utilization"))
    failures, empty, report = {}, set(), []
    for inline in (False, True):
        for query in dashboards.panel_queries(RATE_INTERVAL, inline_rules=inline):
            where = f"{query.dashboard}/{query.panel_id} {query.panel_title}/{query.ref_id}"
            try:
                result = prometheus.query(query.expr)
            except promserver.PrometheusError as exc:
                failures[f"{where} inline={inline}"] = str(exc)
                continue
            report.append({"panel": where, "inline": inline, "series": len(result["result"]),
                           "gpu_only": query.gpu_only, "expr": query.expr})
            if not _has_data(result):
                empty.add((query.dashboard, query.panel_id, query.ref_id, query.gpu_only))
    (observed_dir / "dashboard_panels.json").write_text(json.dumps(report, indent=1))
    assert not failures, json.dumps(failures, indent=2)
    assert not {entry for entry in empty if not entry[3]}, f"panels without data: {sorted(empty)}"
    gpu_queries = {(q.dashboard, q.panel_id, q.ref_id, True) for q in dashboards.panel_queries() if q.gpu_only}
    assert gpu_queries, "the GPU panels are expected to be marked"
    if not gpu_present:  # CPU-only: the empty ones are exactly the GPU-only ones
        assert empty == gpu_queries


def test_rules_and_alert_state_after_the_load(prometheus, loaded):
    """The recorded series exist with sane values; no alert fires for a healthy stack under a short load."""
    ratio = prometheus.query('job:gateway_detection_5xx_ratio:rate5m{job="gateway"}')["result"]
    assert ratio and float(ratio[0]["value"][1]) == 0.0
    p95 = prometheus.query('job:gateway_request_duration_seconds:p95_5m{job="gateway"}')["result"]
    assert p95 and 0 < float(p95[0]["value"][1]) < 30
    batch = prometheus.query('model:nv_inference_batch_size:rate5m{model="mask_detection"}')["result"]
    assert batch and float(batch[0]["value"][1]) >= 1
    firing = [alert for alert in prometheus.api("alerts")["alerts"] if alert["state"] == "firing"]
    assert firing == []


def test_counts_agree_with_what_was_sent_across_workers(prometheus, loaded, observed_stack):
    """Multiprocess merging is right: Prometheus sees every request the load made, by status, whichever
    worker served it; the error counter matches the codes the clients were told."""
    sent, (statuses_before, errors_before) = loaded
    statuses, errors = _prometheus_counts(prometheus)
    assert statuses - statuses_before == sent.statuses
    batches = 6  # mixed_load: two batches per round, three rounds, one undecodable part in each
    expected_errors = Counter(sent.error_codes)
    expected_errors["invalid_image"] += batches  # an image failed inside an answered batch is counted too
    assert errors - errors_before == expected_errors


def test_exemplars_reach_prometheus_with_trace_ids_the_receiver_has(prometheus, loaded, otlp_receiver):
    now = time.time()
    found = prometheus.api("query_exemplars", {
        "query": 'gateway_stage_duration_seconds_bucket{job="gateway", stage="total"}',
        "start": f"{now - 600:.3f}", "end": f"{now:.3f}"})
    trace_ids = {exemplar["labels"]["trace_id"] for series in found for exemplar in series["exemplars"]}
    assert trace_ids, "no exemplar stored: the OpenMetrics scrape carried none"
    received = {span.trace_id for span in otlp_receiver.snapshot()}
    assert trace_ids <= received, "an exemplar names a trace the trace backend never received"


# --------------------------------------------------------------------------- the merged /metrics itself
def _families(text: str) -> tuple[Counter, Counter]:
    helps, types = Counter(), Counter()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps[line.split()[2]] += 1
        elif line.startswith("# TYPE "):
            types[line.split()[2]] += 1
    return helps, types


@pytest.mark.parametrize("accept", [None, OPENMETRICS], ids=["text", "openmetrics"])
def test_merged_metrics_have_each_family_once_and_triton_s(observed_stack, loaded, accept):
    response = requests.get(observed_stack.url + "/metrics", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    text = response.text
    helps, types = _families(text)
    duplicated = {name for name, count in helps.items() if count > 1} | {n for n, c in types.items() if c > 1}
    assert duplicated == set()
    assert set(helps) <= set(types)
    assert 'nv_inference_count{model="mask_detection",version="1"}' in text
    assert "gateway_triton_metrics_up 1.0" in text
    for family in ("flask_http_request_total", "flask_http_request_duration_seconds", "gateway_inflight_requests",
                   "gateway_stage_duration_seconds", "nv_inference_request_success"):
        assert family in types or family.removesuffix("_total") in types, family
    if accept:  # strict OpenMetrics: prometheus_client's parser rejects a malformed exposition
        from prometheus_client.openmetrics.parser import text_string_to_metric_families

        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        families = {family.name: family for family in text_string_to_metric_families(text)}
        exemplars = [sample.exemplar for sample in families["gateway_stage_duration_seconds"].samples
                     if sample.exemplar is not None]
        assert exemplars and all(len(e.labels["trace_id"]) == 32 for e in exemplars)
        assert families["nv_inference_count"].type == "unknown"  # Triton's counter without _total
    else:
        from prometheus_client.parser import text_string_to_metric_families

        assert response.headers["Content-Type"].startswith("text/plain")
        assert " # {" not in text  # no exemplars in the classic format
        list(text_string_to_metric_families(text))
