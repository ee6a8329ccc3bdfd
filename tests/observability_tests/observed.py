"""Names and a bounded mixed load shared by the observability tests and their conftest."""
from __future__ import annotations

import io
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import requests

GATEWAY_SERVICE = "facemask-gateway"  # OTEL_SERVICE_NAME of the observed gateway
TRITON_SERVICE = "triton-inference-server"  # Triton's own service.name
BSP_DELAY_MS = 100  # both exporters flush their span batches this often


@dataclass
class LoadResult:
    """What a load run sent and got: HTTP statuses, error codes, the images the gateway answered for."""

    statuses: Counter = field(default_factory=Counter)
    error_codes: Counter = field(default_factory=Counter)  # request-level error codes
    requests: int = 0

    @property
    def succeeded(self) -> int:
        return sum(count for status, count in self.statuses.items() if status < 400)


def _encode(image, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def mixed_load(url: str, images: dict, rounds: int = 3, concurrency: int = 4) -> LoadResult:
    """A few dozen requests: good images as raw JPEG/PNG, multipart, annotated JPEG and a batch with one bad
    part, plus bad requests (empty, undecodable, wrong type, bad and out-of-range parameters, unknown route)."""
    hopper, astronaut = images["grace_hopper"], images["astronaut"]
    hopper_jpeg, astronaut_png = _encode(hopper, ".jpg"), _encode(astronaut, ".png")

    def raw(data, content_type="image/jpeg", query="", accept="application/json"):
        return lambda session: session.post(f"{url}/v1/detect{query}", data=data,
                                            headers={"Content-Type": content_type, "Accept": accept})

    def multipart(session):
        return session.post(f"{url}/v1/detect", files={"image": ("a.png", io.BytesIO(astronaut_png), "image/png")})

    def batch(session):
        files = [("images", ("h.jpg", io.BytesIO(hopper_jpeg), "image/jpeg")),
                 ("images", ("a.png", io.BytesIO(astronaut_png), "image/png")),
                 ("images", ("notes.jpg", io.BytesIO(b"not an image"), "image/jpeg"))]
        return session.post(f"{url}/v1/detect/batch", files=files)

    good = [raw(hopper_jpeg), raw(astronaut_png, "image/png"), multipart, raw(hopper_jpeg, accept="image/jpeg"),
            batch, raw(hopper_jpeg, query="?confidence=0.6&max_faces=5")]
    bad = [raw(b""), raw(b"\xff\xd8 definitely not a jpeg"), raw(hopper_jpeg, "text/plain"),
           raw(hopper_jpeg, query="?confidence=abc"), raw(hopper_jpeg, query="?confidence=7"),
           lambda session: session.get(f"{url}/v1/nope")]
    calls = (good * 2 + bad) * rounds
    result = LoadResult()

    def run(call):
        with requests.Session() as session:  # a fresh connection each: requests spread over the workers
            response = call(session)
        code = None
        if response.status_code >= 400:
            code = response.json()["error"]["code"]
        return response.status_code, code

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for status, code in pool.map(run, calls):
            result.requests += 1
            result.statuses[status] += 1
            if code:
                result.error_codes[code] += 1
    return result


def load_compose_module(name: str):
    """compose/<name>.py (compose/ is not a package), loaded by path once per process."""
    import importlib.util
    import sys
    from pathlib import Path

    module_name = f"compose_{name}"
    if module_name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "compose" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[module_name]
