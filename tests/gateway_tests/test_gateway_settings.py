"""Settings come from GATEWAY_* variables (and the OTel/Prometheus names) with typed defaults."""
import pytest

from gateway.settings import Settings, env_name


def test_defaults_document_the_limits():
    settings = Settings.from_env({})
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.max_pixels == 40_000_000
    assert settings.max_side == 1280
    assert settings.model_name == "mask_detection"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)


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
