"""The JSON access log of a real gunicorn run (2 workers appending to one file): every line parses, carries the
documented keys, and `python -m gateway.log_analysis` over it reports what the clients saw."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from gateway.access_log import KEYS
from gateway.log_analysis import parse_line
from observed import mixed_load

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def logged(observed_stack, real_images):
    """The lines a bounded mixed load added to the access log, and what the load saw."""
    before = len(observed_stack.access_log.read_text().splitlines())
    result = mixed_load(observed_stack.url, real_images, rounds=2)
    deadline = time.monotonic() + 10
    while True:
        lines = observed_stack.access_log.read_text().splitlines()[before:]
        if len(lines) >= result.requests or time.monotonic() > deadline:
            return lines, result
        time.sleep(0.1)


def test_one_line_per_request_with_the_documented_keys(logged, observed_stack):
    lines, result = logged
    assert len(lines) == result.requests
    every_line = observed_stack.access_log.read_text().splitlines()  # the whole session's, other tests' too
    for line in every_line:
        record = json.loads(line)
        assert tuple(record) == KEYS, line
        parse_line(line)  # what log_analysis accepts
    records = [json.loads(line) for line in lines]
    assert len({record["request_id"] for record in records}) == len(records)
    assert all(re.fullmatch(r"[0-9a-f]{32}", r["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", r["span_id"])
               for r in records), "the gateway samples every request here (parentbased_traceidratio 1.0)"
    single = [r for r in records if r["route"] == "/v1/detect" and r["status"] == 200]
    assert single and all(r["image_width"] and r["image_height"] and r["faces"] >= 1 for r in single)
    batches = [r for r in records if r["route"] == "/v1/detect/batch"]
    assert batches and all(r["image_width"] is None and r["faces"] >= 2 for r in batches)
    failed = [r for r in records if r["status"] >= 400]
    assert sorted(r["error_code"] for r in failed) == sorted(result.error_codes.elements())
    assert {r["route"] for r in records if r["status"] == 404} == {None}


def test_log_analysis_reports_the_requests_and_success_rate(logged, tmp_path):
    lines, result = logged
    log = tmp_path / "access.log"
    log.write_text("\n".join(lines) + "\n")
    completed = subprocess.run([sys.executable, "-m", "gateway.log_analysis", str(log), "--json", "--top", "20"],
                               capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(completed.stdout)
    assert report["requests"] == result.requests and report["malformed"] == 0
    assert report["success_rate"] == pytest.approx(result.succeeded / result.requests)
    assert report["status_counts"] == {str(status): count for status, count in sorted(result.statuses.items())}
    assert {entry["code"]: entry["count"] for entry in report["top_error_codes"]} == dict(result.error_codes)
    assert report["traced_requests"] == result.requests and report["faces_total"] > 0
    text = subprocess.run([sys.executable, "-m", "gateway.log_analysis", str(log)], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert f"requests        {result.requests}  (0 malformed" in text
