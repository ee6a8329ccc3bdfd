"""Prometheus config, recording and alerting rules, and Alertmanager config, checked by the real tools:
`promtool check config|rules`, `promtool test rules` and `amtool check-config` (Debian packages
`prometheus` and `prometheus-alertmanager`)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

COMPOSE = Path(__file__).resolve().parent.parent / "compose"
PROMETHEUS_CONFIG = COMPOSE / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((COMPOSE / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((COMPOSE / "prometheus" / "tests").glob("*.yml"))
ALERTMANAGER_CONFIG = COMPOSE / "alertmanager" / "alertmanager.yml"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is required (Debian package `{package}`, installed by `make system-deps`)")
    return path


def run(*command) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def alerts() -> dict[str, dict]:
    found = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    assert rule["alert"] not in found, f"alert {rule['alert']} defined twice"
                    found[rule["alert"]] = rule
    return found


def test_rule_and_test_files_exist():
    assert {path.name for path in RULE_FILES} == {"alerts.yml", "recording.yml"}
    assert RULE_TESTS


def test_promtool_check_config():
    output = run(tool("promtool", "prometheus"), "check", "config", PROMETHEUS_CONFIG).stdout
    assert f"{len(RULE_FILES)} rule files found" in output


def test_promtool_check_rules():
    run(tool("promtool", "prometheus"), "check", "rules", *RULE_FILES)


def test_promtool_test_rules():
    result = run(tool("promtool", "prometheus"), "test", "rules", *RULE_TESTS)
    assert "FAILED" not in result.stdout + result.stderr


def test_amtool_check_config():
    run(tool("amtool", "prometheus-alertmanager"), "check-config", ALERTMANAGER_CONFIG)


def test_every_alert_has_firing_and_silent_unit_tests():
    firing, silent = set(), set()
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        for case in document["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    defined = set(alerts())
    assert len(defined) >= 8
    assert defined - firing == set(), f"alerts never tested firing: {sorted(defined - firing)}"
    assert defined - silent == set(), f"alerts never tested silent: {sorted(defined - silent)}"
    assert (firing | silent) - defined == set(), "tests name alerts that do not exist"


def test_the_required_alerts_exist():
    names = set(alerts())
    for required in ("GatewayDown", "GatewayHighErrorRatio", "GatewayLatencyP95AboveSLO", "TritonQueueTimeHigh",
                     "TritonGpuMemoryHigh", "TritonGpuUtilizationHigh", "GatewayNoTraffic",
                     "TritonMetricsUnreachable"):
        assert required in names


def test_every_alert_has_severity_for_and_annotations():
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        assert rule.get("for"), f"{name} fires on a single evaluation"
        assert {"summary", "description"} <= set(rule.get("annotations", {})), name


def test_every_alert_links_its_own_runbook_section():
    """runbook_url names docs/observability.md and the anchor GitHub gives the alert's `#### <Alert>` heading."""
    docs = COMPOSE.parent / "docs" / "observability.md"
    headings = {line[5:].strip() for line in docs.read_text().splitlines() if line.startswith("#### ")}
    for name, rule in alerts().items():
        assert rule["annotations"].get("runbook_url") == f"docs/observability.md#{name.lower()}", name
        assert name in headings, f"docs/observability.md has no '#### {name}' section"


def test_alertmanager_inhibition_names_existing_alerts():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    names = set(alerts())
    for rule in config.get("inhibit_rules", []):
        for matcher in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            if matcher.startswith("alertname=~"):
                for value in matcher.split("=~", 1)[1].strip('"').split("|"):
                    assert value in names, matcher
            elif matcher.startswith("alertname="):
                assert matcher.split("=", 1)[1].strip('"') in names, matcher
