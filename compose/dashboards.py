"""The Grafana dashboards' PromQL, made evaluable outside Grafana, and the metric-name contract it must keep.

    from dashboards import panel_queries          # (load this file by path: compose/ is not a package)
    for query in panel_queries(rate_interval="1m"):
        ...  # GET /api/v1/query?query=<query.expr> against a Prometheus that scrapes the gateway

`panel_queries()` lists every target expression of every panel (rows' nested panels included), with
Grafana's variables replaced by concrete values so that a plain Prometheus accepts them, plus the
selector of every `label_values(...)` template variable. Recording-rule names (from
compose/prometheus/rules/) stay as they are unless `inline_rules=True`, which replaces each by its
defining expression, for a Prometheus that does not load the rule files or has not evaluated them yet.

Only the standard library and PyYAML (for the rule files) are used.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

COMPOSE_DIR = Path(__file__).resolve().parent
DASHBOARD_DIR = COMPOSE_DIR / "grafana" / "dashboards"
RULES_DIR = COMPOSE_DIR / "prometheus" / "rules"

# ---------------------------------------------------------------------------------------------------
# The metric contract: what the gateway's /metrics exposes (its own families merged with Triton's).
# Histograms are listed by family name; their _bucket/_sum/_count series are allowed.
GATEWAY_COUNTERS = ("flask_http_request_total", "flask_http_request_exceptions_total",
                    "gateway_detections_total", "gateway_errors_total", "gateway_triton_requests_total",
                    "gateway_triton_inline_fallbacks_total")
GATEWAY_GAUGES = ("gateway_inflight_requests", "gateway_worker_threads", "gateway_triton_metrics_up",
                  "gateway_worker_oldest_request_start_timestamp_seconds",
                  "gateway_worker_last_answer_timestamp_seconds")
GATEWAY_HISTOGRAMS = ("flask_http_request_duration_seconds", "gateway_stage_duration_seconds",
                      "gateway_faces_per_image", "gateway_detection_confidence", "gateway_image_pixels")
# Seen on tritonserver 2.51 (pip nvidia-pytriton build, CPU) after inferences; nv_inference_request_failure
# carries a `reason` label (REJECTED, CANCELED, BACKEND, OTHER) besides `model` and `version`.
TRITON_MODEL_METRICS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                        "nv_inference_exec_count", "nv_inference_request_duration_us",
                        "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
                        "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
                        "nv_inference_pending_request_count")
TRITON_CPU_METRICS = ("nv_cpu_utilization", "nv_cpu_memory_used_bytes", "nv_cpu_memory_total_bytes")
# Only where Triton sees a GPU (label gpu_uuid); names as in the 2.51 binary, absent on a CPU-only server.
TRITON_GPU_METRICS = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes",
                      "nv_gpu_power_usage")
# Panels that show only GPU series and so stay empty ("No data") on a CPU-only Triton, by dashboard file stem
# and panel id. Every other panel must show data once the stack has served some traffic
# (tests/observability_tests/test_dashboards_live.py); tests/test_dashboards_static.py checks that these are
# exactly the panels reading nothing but TRITON_GPU_METRICS.
GPU_ONLY_PANELS = {"triton": frozenset({10, 11, 12})}
# Series Prometheus itself attaches to every target.
PROMETHEUS_SYNTHETIC = ("up",)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Grafana's built-in interval variables, replaced by these unless the caller says otherwise.
DEFAULT_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
                     "__interval_ms": "15000", "__range_s": "3600", "__range_ms": "3600000"}


def contract_metric_names() -> frozenset[str]:
    """Every series name the dashboards and rules may read from the gateway's scrape (histograms expanded)."""
    names = set(GATEWAY_COUNTERS + GATEWAY_GAUGES + TRITON_MODEL_METRICS + TRITON_CPU_METRICS
                + TRITON_GPU_METRICS + PROMETHEUS_SYNTHETIC)
    names.update(family + suffix for family in GATEWAY_HISTOGRAMS for suffix in HISTOGRAM_SUFFIXES)
    return frozenset(names)


# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file stem, e.g. "triton"
    panel_id: int
    panel_title: str
    ref_id: str  # target refId; "var:<name>" for a template variable's selector
    expr: str  # PromQL with Grafana variables substituted
    raw_expr: str  # as written in the dashboard

    @property
    def gpu_only(self) -> bool:
        """Marked in GPU_ONLY_PANELS: empty on a CPU-only Triton by design."""
        return self.panel_id in GPU_ONLY_PANELS.get(self.dashboard, frozenset())


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict]:
    """Every dashboard JSON under `directory`, by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def iter_panels(dashboard: Mapping) -> Iterator[dict]:
    """All panels, rows' nested (collapsed) panels included; rows themselves too."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) or []


def template_variables(dashboard: Mapping) -> list[dict]:
    return list(dashboard.get("templating", {}).get("list", []))


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", re.S)


def variable_selector(variable: Mapping) -> str | None:
    """The PromQL selector inside a `label_values(selector, label)` query variable; None for other kinds."""
    if variable.get("type") != "query":
        return None
    query = variable.get("query")
    text = query.get("query", "") if isinstance(query, Mapping) else str(query or "")
    match = _LABEL_VALUES.match(text)
    return match["selector"] if match else None


def variable_values(dashboard: Mapping, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """A concrete value for every variable: the built-ins, then each template variable's 'All' value."""
    values = dict(DEFAULT_VARIABLES)
    for variable in template_variables(dashboard):
        if variable.get("includeAll") and variable.get("allValue") is not None:
            values[variable["name"]] = variable["allValue"]
        else:
            values[variable["name"]] = ".*"  # used in =~ matchers
    values.update(overrides or {})
    return values


_VARIABLE = re.compile(r"\$\{(?P<braced>[a-zA-Z0-9_]+)(?::[a-zA-Z]+)?\}"  # ${name}, ${name:regex}
                       r"|\$(?P<plain>[a-zA-Z0-9_]+)"  # $name
                       r"|\[\[(?P<old>[a-zA-Z0-9_]+)\]\]")  # [[name]] (deprecated syntax)


def substitute_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace $name, ${name}, ${name:format} and [[name]] by `values[name]`; unknown names are an error."""
    def replace(match: re.Match) -> str:
        name = match["braced"] or match["plain"] or match["old"]
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def panel_queries(rate_interval: str = "1m", *, directory: Path = DASHBOARD_DIR,
                  variables: Mapping[str, str] | None = None, inline_rules: bool = False,
                  include_variables: bool = True) -> list[PanelQuery]:
    """Every panel target's expression (and each label_values selector), ready for /api/v1/query."""
    rules = recording_rules() if inline_rules else {}
    queries = []
    for name, dashboard in load_dashboards(directory).items():
        values = variable_values(dashboard, {"__rate_interval": rate_interval, **(variables or {})})
        found: list[tuple[int, str, str, str]] = []
        if include_variables:
            for variable in template_variables(dashboard):
                selector = variable_selector(variable)
                if selector is not None:
                    found.append((0, f"variable {variable['name']}", f"var:{variable['name']}", selector))
        for panel in iter_panels(dashboard):
            for target in panel.get("targets", []) or []:
                if target.get("expr"):
                    found.append((panel["id"], panel.get("title", ""), target.get("refId", ""), target["expr"]))
        for panel_id, title, ref_id, raw in found:
            expr = substitute_variables(raw, values)
            if rules:
                expr = inline_recording_rules(expr, rules)
            queries.append(PanelQuery(name, panel_id, title, ref_id, expr, raw))
    return queries


# ---------------------------------------------------------------------------------------------------
def rule_groups(directory: Path = RULES_DIR) -> list[dict]:
    import yaml  # PyYAML

    groups = []
    for path in sorted(directory.glob("*.yml")):
        groups.extend((yaml.safe_load(path.read_text()) or {}).get("groups", []))
    return groups


def recording_rules(directory: Path = RULES_DIR) -> dict[str, str]:
    """Recorded series name -> its defining expression."""
    return {rule["record"]: rule["expr"].strip() for group in rule_groups(directory)
            for rule in group.get("rules", []) if "record" in rule}


def alert_rules(directory: Path = RULES_DIR) -> dict[str, dict]:
    """Alert name -> its rule (expr, for, labels, annotations)."""
    return {rule["alert"]: rule for group in rule_groups(directory)
            for rule in group.get("rules", []) if "alert" in rule}


def bare_rule_references(expr: str, rule_names: Iterable[str]) -> tuple[set[str], set[str]]:
    """(recording rules referenced bare, those followed by a {matcher} or [range], which cannot be inlined)."""
    stripped = _strip_strings(expr)
    bare, decorated = set(), set()
    for name in rule_names:
        for match in re.finditer(rf"(?<![\w:]){re.escape(name)}(?![\w:])", stripped):
            following = stripped[match.end():].lstrip()
            (decorated if following[:1] in ("{", "[") else bare).add(name)
    return bare, decorated


MAX_RULE_NESTING = 8  # a rule built on rules built on rules...; deeper is taken for a cycle


def inline_recording_rules(expr: str, rules: Mapping[str, str]) -> str:
    """Replace each bare recording-rule name by `(its expression)`, recursively; a decorated reference is an error."""
    for _ in range(MAX_RULE_NESTING + 1):  # the last pass finds nothing left to replace
        bare, decorated = bare_rule_references(expr, rules)
        if decorated:
            raise ValueError(f"recording rules {sorted(decorated)} carry matchers or a range in {expr!r}: "
                             "they cannot be inlined")
        if not bare:
            return expr
        for name in sorted(bare, key=len, reverse=True):
            expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])", lambda _: f"({rules[name]})", expr)
    raise ValueError(f"recording rules nest deeper than {MAX_RULE_NESTING} levels (a cycle?) in {expr!r}")


# ---------------------------------------------------------------------------------------------------
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_IDENTIFIER = re.compile(r"(?<![\w.:])(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)")
_KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
             "offset", "inf", "nan", "start", "end"}


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric (series) names an expression selects: identifiers that are not functions, keywords or labels.

    A light tokeniser, enough for dashboards and rules (Prometheus itself checks the syntax): strings,
    {label matchers}, [ranges], `offset`/`@` modifiers and by/without/on/ignoring/group_* label lists
    are removed first; an identifier followed by "(" is a function or aggregation.
    """
    text = _strip_strings(expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text, flags=re.I)
    text = re.sub(r"@\s*(?:start\(\)|end\(\)|[0-9.]+)", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match["name"]
        if name.lower() in _KEYWORDS:
            continue
        if text[match.end():].lstrip().startswith("("):
            continue  # a function or an aggregation operator
        names.add(name)
    return names


def main() -> None:
    """Print every query, one per line: dashboard, panel id, refId, expression."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rate-interval", default="1m")
    parser.add_argument("--inline-rules", action="store_true")
    args = parser.parse_args()
    for query in panel_queries(args.rate_interval, inline_rules=args.inline_rules):
        print(f"{query.dashboard}\t{query.panel_id}\t{query.ref_id}\t{query.expr}")


if __name__ == "__main__":
    main()
