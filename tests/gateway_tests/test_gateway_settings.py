"""Settings come from GATEWAY_* variables (and the OTel/Prometheus names) with typed defaults."""
import re
from dataclasses import fields

import pytest
from gateway_helpers import REPO_ROOT

from gateway.settings import Settings, env_name


def settings_section() -> str:
    """The "### Settings" section of docs/gateway.md, its table and the prose around it."""
    text = (REPO_ROOT / "docs" / "gateway.md").read_text()
    return text.split("### Settings", 1)[1].split("\n### ", 1)[0]


def documented_defaults() -> dict[str, str | None]:
    """Variable -> default as the docs table states it ("" for unset; None where it points elsewhere)."""
    rows = [line.strip().strip("|").split("|") for line in settings_section().splitlines()
            if line.startswith("| `")]
    documented = {}
    for variables, default, _meaning in ([cell.strip() for cell in row] for row in rows):
        stated = re.sub(r"\(.*?\)", "", default).strip()  # a remark in brackets is not the default
        names, values = re.findall(r"`([^`]*)`", variables), re.findall(r"`([^`]*)`", stated)
        if stated == "unset":
            values = [""] * len(names)
        elif not values:  # "see observability.md"
            values = [None] * len(names)
        assert len(values) == len(names), (variables, default)
        documented.update(zip(names, values))
    return documented


def test_documented_defaults_are_the_defaults():
    """The docs' settings table is what operators read: a default changed in code alone would mislead them."""
    by_variable = {env_name(field.name): field.name for field in fields(Settings)}
    documented = documented_defaults()
    assert len(documented) >= 20  # the table was found and parsed
    defaults = Settings()
    for variable, stated in documented.items():
        assert variable in by_variable, f"docs/gateway.md documents {variable}, which no setting reads"
        name = by_variable[variable]
        if stated == "":
            assert getattr(defaults, name) == "", f"{variable} is documented as unset"
        elif stated is not None:  # read the documented text the way the environment is read, e.g. "30" -> 30.0
            assert getattr(Settings.from_env({variable: stated}), name) == getattr(defaults, name), (variable, stated)


def test_every_setting_is_documented():
    """A new knob must reach the docs operators read."""
    section = settings_section()
    undocumented = {field.name for field in fields(Settings) if f"`{env_name(field.name)}`" not in section}
    assert undocumented == set()


def test_environment_overrides_are_typed():
    settings = Settings.from_env({"GATEWAY_TRITON_URL": "triton:9001", "GATEWAY_TRITON_TIMEOUT_S": "2.5",
                                  "GATEWAY_MAX_SIDE": "640", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert settings.triton_url == "triton:9001"
    assert settings.triton_timeout_s == 2.5
    assert settings.max_side == 640
    assert settings.otlp_endpoint == "http://c:4318"


def test_a_malformed_value_names_its_variable():
    with pytest.raises(ValueError, match="GATEWAY_PORT"):
        Settings.from_env({"GATEWAY_PORT": "eighty"})


@pytest.mark.parametrize("raw", ["-1", "nan", "1e12"])
def test_a_client_timeout_that_is_not_a_number_of_seconds_is_refused(raw):
    with pytest.raises(ValueError, match="GATEWAY_CLIENT_TIMEOUT_S"):
        Settings.from_env({"GATEWAY_CLIENT_TIMEOUT_S": raw})
    assert Settings.from_env({"GATEWAY_CLIENT_TIMEOUT_S": "0"}).client_timeout_s == 0


def test_explicit_overrides_win():
    assert Settings.from_env({"GATEWAY_PORT": "9000"}, port=9100).port == 9100
    assert env_name("prometheus_multiproc_dir") == "PROMETHEUS_MULTIPROC_DIR"


def test_set_in_names_only_what_the_environment_chooses():
    environ = {"GATEWAY_TRITON_URL": "triton:8001", "GATEWAY_MAX_SIDE": "", "OTEL_SERVICE_NAME": "cams"}
    assert Settings.set_in(environ) == {"triton_url", "service_name"}  # an empty variable means the default
    assert Settings.set_in({}) == frozenset()


def test_triton_metrics_follow_the_triton_host_unless_set():
    """A remote Triton's metrics are on its own host, not on this one's port 8002 (which another Triton may hold)."""
    assert Settings.from_env({"GATEWAY_TRITON_URL": "triton:8001"}).triton_metrics_url == "http://triton:8002/metrics"
    assert Settings.from_env({"GATEWAY_TRITON_URL": "[fd00::7]:9001"}).triton_metrics_url == \
        "http://[fd00::7]:8002/metrics"
    chosen = {"GATEWAY_TRITON_URL": "triton:8001", "GATEWAY_TRITON_METRICS_URL": "http://proxy:9102/triton"}
    assert Settings.from_env(chosen).triton_metrics_url == "http://proxy:9102/triton"
    assert Settings.from_env({}).triton_metrics_url == "http://127.0.0.1:8002/metrics"
