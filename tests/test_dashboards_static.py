"""The Grafana dashboards, checked without Grafana: JSON, panel ids, datasources, and every PromQL
expression parsed by a real Prometheus and reading only contract metrics or recording rules."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parent.parent / "compose"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"compose_{name}", COMPOSE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


dashboards = _load("dashboards")
promserver = _load("promserver")

DASHBOARD_FILES = sorted(dashboards.DASHBOARD_DIR.glob("*.json"))
DATASOURCE_UIDS = {"prometheus", "jaeger", "alertmanager"}  # provisioned in compose/grafana/provisioning


def test_the_three_dashboards_exist():
    assert {path.stem for path in DASHBOARD_FILES} == {"service-health", "triton", "business"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_dashboard_loads_with_unique_ids_and_known_datasources(path):
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert "id" not in dashboard or dashboard["id"] is None, "provisioned dashboards must not carry a db id"
    panels = list(dashboards.iter_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}: {ids}"
    for panel in panels:
        assert panel.get("title"), f"panel {panel['id']} has no title"
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, f"panel {panel['id']} overflows the grid"
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['id']} {panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"panel {panel['id']} repeats a refId"
        for source in [panel.get("datasource")] + [target.get("datasource") for target in panel["targets"]]:
            if source is not None:
                assert source.get("uid") in DATASOURCE_UIDS, f"panel {panel['id']}: unknown datasource {source}"


def test_dashboard_uids_are_unique():
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARD_FILES]
    assert len(uids) == len(set(uids))


def test_every_expression_reads_only_contract_metrics_or_recording_rules():
    allowed = dashboards.contract_metric_names() | set(dashboards.recording_rules())
    queries = dashboards.panel_queries()
    assert len(queries) > 30
    unknown = {}
    for query in queries:
        names = dashboards.metric_names(query.raw_expr)
        assert names, f"{query.dashboard}/{query.panel_title}: no metric found in {query.raw_expr!r}"
        if names - allowed:
            unknown[f"{query.dashboard}/{query.panel_title}/{query.ref_id}"] = sorted(names - allowed)
    assert not unknown, f"metrics outside the contract: {unknown}"


def test_the_rules_read_only_contract_metrics_or_recording_rules():
    allowed = dashboards.contract_metric_names() | set(dashboards.recording_rules())
    expressions = list(dashboards.recording_rules().values())
    expressions += [rule["expr"] for rule in dashboards.alert_rules().values()]
    unknown = {expr: sorted(dashboards.metric_names(expr) - allowed) for expr in expressions
               if dashboards.metric_names(expr) - allowed}
    assert not unknown


def test_gpu_only_panels_are_exactly_those_reading_only_gpu_metrics():
    """The panels allowed to stay empty on a CPU-only machine are marked, and no other panel is."""
    gpu = set(dashboards.TRITON_GPU_METRICS)
    reading_only_gpu = {(query.dashboard, query.panel_id) for query in dashboards.panel_queries()
                        if dashboards.metric_names(query.raw_expr) <= gpu}
    marked = {(name, panel_id) for name, ids in dashboards.GPU_ONLY_PANELS.items() for panel_id in ids}
    assert marked == reading_only_gpu


def test_recording_rules_in_dashboards_can_be_inlined():
    """A dashboard uses a recorded series bare, so panel_queries(inline_rules=True) can expand it."""
    rules = dashboards.recording_rules()
    used = set()
    for query in dashboards.panel_queries():
        bare, decorated = dashboards.bare_rule_references(query.raw_expr, rules)
        assert not decorated, f"{query.dashboard}/{query.panel_title}: {decorated} with matchers or a range"
        used |= bare
    assert used, "the dashboards are expected to use some recording rules"
    for query in dashboards.panel_queries(inline_rules=True):
        assert not dashboards.metric_names(query.expr) & set(rules), query.expr


def test_grafana_variables_are_all_substituted():
    for query in dashboards.panel_queries(rate_interval="2m"):
        assert "$" not in query.expr and "[[" not in query.expr, query.expr
    rated = [query for query in dashboards.panel_queries(rate_interval="2m") if "$__rate_interval" in query.raw_expr]
    assert rated and all("[2m]" in query.expr for query in rated)


def test_metric_name_extraction():
    expr = ('histogram_quantile(0.95, sum by (le, stage) (rate(a_bucket{job="x", stage=~"t.*"}[5m]))) '
            '/ on (job) group_left (model) b:rec:rate5m offset 5m and c @ 100 > 1e3 or vector(0) '
            'unless d{x="sum(e)"}')
    assert dashboards.metric_names(expr) == {"a_bucket", "b:rec:rate5m", "c", "d"}


# ------------------------------------------------------------------ parsing by a real Prometheus
@pytest.fixture(scope="module")
def prometheus():
    if promserver.prometheus_binary() is None:
        pytest.fail("the `prometheus` binary is required (Debian package `prometheus`, see the Makefile)")
    with promserver.PrometheusServer() as server:  # no scrape target: parsing needs no data
        yield server


def test_prometheus_rejects_a_bad_expression(prometheus):
    """The check below is meaningful: a parse error is a 400 with errorType bad_data."""
    with pytest.raises(promserver.PrometheusError) as info:
        prometheus.query("sum(rate(flask_http_request_total[5m])")
    assert info.value.error_type == "bad_data" and info.value.status == 400


def test_every_panel_expression_parses(prometheus):
    failures = {}
    for inline in (False, True):
        for query in dashboards.panel_queries(inline_rules=inline):
            try:
                prometheus.query(query.expr)
            except promserver.PrometheusError as exc:
                failures[f"{query.dashboard}/{query.panel_title}/{query.ref_id} inline={inline}"] = str(exc)
    assert not failures, json.dumps(failures, indent=2)
