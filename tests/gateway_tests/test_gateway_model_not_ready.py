"""A live gateway whose Triton is up but does not serve its model: not ready, 503 with Retry-After, still alive."""
import pytest
from gateway_helpers import Gunicorn, children, free_port

pytestmark = pytest.mark.triton

MISSING_MODEL = "no_such_model"


@pytest.fixture(scope="module")
def missing_model_gateway(gateway_stack):
    """A second gunicorn gateway on the session's Triton, told to call a model Triton does not have."""
    env = gateway_stack.environment(free_port(), {"GATEWAY_MODEL_NAME": MISSING_MODEL, "GATEWAY_WORKERS": "1"})
    # /readyz stays 503 for this gateway, so it counts as started once it is alive
    gateway = Gunicorn(env, gateway_stack.log_dir / "model_not_ready.log").start(ready_path="/healthz")
    yield gateway
    gateway.stop()


def test_readyz_says_the_model_is_not_ready(missing_model_gateway, http):
    """An orchestrator must keep traffic away, and be told it is the model, not Triton, that is missing."""
    ready = http.get(missing_model_gateway.url + "/readyz", timeout=30)
    assert ready.status_code == 503
    body = ready.json()
    assert body["error"]["code"] == "model_not_ready" and MISSING_MODEL in body["error"]["message"]
    assert body["request_id"] == ready.headers["X-Request-ID"]


def test_detect_answers_503_with_retry_after_and_the_gateway_survives(missing_model_gateway, http, hopper_jpeg):
    """A real image for a model Triton lacks is a retryable 503, every time, not a 500 or a dead worker."""
    workers = children(missing_model_gateway.process.pid)
    for _ in range(2):
        response = http.post(missing_model_gateway.url + "/v1/detect", data=hopper_jpeg,
                             headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "model_not_ready"
        assert MISSING_MODEL in response.json()["error"]["message"]
        assert response.headers["Retry-After"] == missing_model_gateway.env["GATEWAY_RETRY_AFTER_S"]
    assert missing_model_gateway.process.poll() is None
    assert children(missing_model_gateway.process.pid) == workers  # the same worker, not a restarted one
    assert http.get(missing_model_gateway.url + "/healthz", timeout=30).json() == {"status": "ok"}
