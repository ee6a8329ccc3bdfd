"""gateway.log_analysis on generated access logs whose answers are computed here independently
(numpy for percentiles, plain counting from the generated records, never from the parser)."""
from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from gateway import log_analysis

START = datetime(2024, 5, 1, 8, 0, tzinfo=timezone.utc)
ERROR_FOR_STATUS = {400: "bad_image", 413: "too_large", 422: "bad_parameter", 429: "queue_full",
                    503: "triton_unavailable", 504: "deadline_exceeded"}


def generate(count: int, seed: int) -> list[dict]:
    """Requests over ~6 hours with a busy late morning, a mix of statuses and a long latency tail."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        hour = rng.choices(range(6), weights=[1, 2, 5, 3, 1, 1])[0]
        ts = START + timedelta(hours=hour, seconds=rng.uniform(0, 3599.999))
        status = rng.choices([200, 400, 413, 422, 429, 503, 504], weights=[85, 4, 2, 2, 2, 3, 2])[0]
        duration = round(rng.lognormvariate(3.5, 0.6) if status != 504 else rng.uniform(10000, 10100), 3)
        ok = status == 200
        records.append({
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "request_id": f"req-{index}", "trace_id": f"{rng.getrandbits(128):032x}" if rng.random() < 0.3 else None,
            "span_id": f"{rng.getrandbits(64):016x}", "route": rng.choice(["/v1/detect", "/v1/detect/batch"]),
            "method": "POST", "status": status, "duration_ms": duration,
            "image_width": 640 if ok else None, "image_height": 480 if ok else None,
            "faces": rng.randint(0, 4) if ok else None, "error_code": None if ok else ERROR_FOR_STATUS[status],
        })
    return records


def expected(records: list[dict], top: int = 5) -> dict:
    durations = np.array([record["duration_ms"] for record in records])
    errors = Counter(record["error_code"] for record in records if record["error_code"])
    hours = Counter(record["ts"][:13] + ":00Z" for record in records)  # all generated in UTC ("...Z")
    success = sum(record["status"] < 400 for record in records)
    return {
        "requests": len(records),
        "success_rate": success / len(records),
        "mean": float(durations.mean()),
        **{f"p{p}": float(np.percentile(durations, p, method="inverted_cdf")) for p in (50, 95, 99)},
        "errors": sorted(errors.items(), key=lambda item: (-item[1], item[0]))[:top],
        "hours": sorted(hours.items(), key=lambda item: (-item[1], item[0]))[:top],
        "faces": sum(record["faces"] or 0 for record in records),
        "traced": sum(record["trace_id"] is not None for record in records),
    }


MALFORMED = [
    "this is not json",
    '{"ts": "2024-05-01T09:00:00Z", "status": 200',  # truncated
    "[1, 2, 3]",
    '"just a string"',
    '{"status": 200, "duration_ms": 5}',  # no ts
    '{"ts": "2024-05-01T09:00:00Z", "duration_ms": 5}',  # no status
    '{"ts": "2024-05-01T09:00:00Z", "status": 200}',  # no duration
    '{"ts": "yesterday", "status": 200, "duration_ms": 5}',
    '{"ts": "2024-05-01T09:00:00Z", "status": "200", "duration_ms": 5}',
    '{"ts": "2024-05-01T09:00:00Z", "status": 200, "duration_ms": -1}',
    '{"ts": "2024-05-01T09:00:00Z", "status": 200, "duration_ms": "fast"}',
    '{"ts": "2024-05-01T09:00:00Z", "status": 99, "duration_ms": 5}',
    '{"ts": "2024-05-01T09:00:00Z", "status": true, "duration_ms": 5}',
    '{"ts": "2024-05-01T09:00:00Z", "status": 200, "duration_ms": NaN}',
]


def write_log(path, records, *, malformed=(), seed=0):
    """Records in order, malformed lines and blank lines scattered between them."""
    rng = random.Random(seed)
    lines = [json.dumps(record) for record in records]
    for bad in malformed:
        lines.insert(rng.randrange(len(lines) + 1), bad)
    lines.insert(rng.randrange(len(lines) + 1), "")
    lines.insert(rng.randrange(len(lines) + 1), "   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.log_analysis", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=60)


def assert_matches(report: dict, want: dict) -> None:
    assert report["requests"] == want["requests"]
    assert report["success_rate"] == pytest.approx(want["success_rate"], abs=1e-12)
    assert report["latency_ms"]["mean"] == pytest.approx(want["mean"], rel=1e-12)
    for p in (50, 95, 99):
        assert report["latency_ms"][f"p{p}"] == want[f"p{p}"], f"p{p}"
    assert [(item["code"], item["count"]) for item in report["top_error_codes"]] == want["errors"]
    assert [(item["hour"], item["count"]) for item in report["busiest_hours"]] == want["hours"]
    assert report["faces_total"] == want["faces"]
    assert report["traced_requests"] == want["traced"]


def test_cli_json_report_matches_independent_computation(tmp_path):
    records = generate(3000, seed=7)
    log = write_log(tmp_path / "access.log", records, malformed=MALFORMED)
    result = run_cli(log, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert_matches(report, expected(records))
    assert report["malformed"] == len(MALFORMED)
    assert report["lines"] == len(records) + len(MALFORMED)  # blank lines are not counted
    assert sum(report["malformed_reasons"].values()) == len(MALFORMED)
    assert report["malformed_reasons"]["missing_key"] == 3
    assert report["client_errors"] + report["server_errors"] + round(report["success_rate"] * 3000) == 3000


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_in_process_analysis_on_several_logs(seed):
    records = generate(500 + 250 * seed, seed=seed)
    report = log_analysis.analyze((json.dumps(record) for record in records), top=3).to_dict()
    assert_matches(report, expected(records, top=3))
    assert report["malformed"] == 0


def test_known_small_log_by_hand():
    """Ten requests whose answers are worked out by hand."""
    durations = [10, 20, 30, 40, 50, 60, 70, 80, 90, 1000]
    statuses = [200, 200, 200, 200, 200, 200, 200, 503, 400, 504]
    codes = [None] * 7 + ["triton_unavailable", "bad_image", "deadline_exceeded"]
    stamps = ["2024-05-01T09:59:59Z"] * 3 + ["2024-05-01T10:00:00Z"] * 3 + ["2024-05-01T11:30:00+02:00"] * 4
    lines = [json.dumps({"ts": ts, "status": status, "duration_ms": ms, "error_code": code})
             for ts, status, ms, code in zip(stamps, statuses, durations, codes)]
    report = log_analysis.analyze(lines)
    assert report.requests == 10 and report.success_rate == 0.7
    assert report.client_errors == 1 and report.server_errors == 2
    assert report.latency_ms["mean"] == 145.0
    # nearest rank: p50 -> 5th value, p95 -> ceil(9.5) = 10th, p99 -> 10th
    assert (report.latency_ms["p50"], report.latency_ms["p95"], report.latency_ms["p99"]) == (50, 1000, 1000)
    # 11:30+02:00 is 09:30 UTC: hour 09 has 3 + 4 requests
    assert report.busiest_hours == [("2024-05-01T09:00Z", 7), ("2024-05-01T10:00Z", 3)]
    assert report.top_error_codes == [("bad_image", 1), ("deadline_exceeded", 1), ("triton_unavailable", 1)]
    assert report.first_ts == "2024-05-01T09:30:00.000Z" and report.last_ts == "2024-05-01T10:00:00.000Z"


def test_text_report_and_stdin(tmp_path):
    records = generate(200, seed=11)
    text = "\n".join(json.dumps(record) for record in records) + "\nnot json\n"
    result = run_cli("-", stdin=text)
    assert result.returncode == 0, result.stderr
    want = expected(records)
    assert f"requests        {len(records)}  (1 malformed line(s) skipped of {len(records) + 1})" in result.stdout
    assert f"{want['success_rate']:.2%}" in result.stdout
    assert f"p95 {want['p95']:.1f} ms" in result.stdout
    code, count = want["errors"][0]
    assert f"{code} ({count})" in result.stdout
    hour, count = want["hours"][0]
    assert f"{hour} ({count})" in result.stdout


def test_gzip_log(tmp_path):
    records = generate(300, seed=5)
    path = tmp_path / "access.log.gz"
    with gzip.open(path, "wt") as stream:
        stream.write("\n".join(json.dumps(record) for record in records))
    result = run_cli(path, "--json", "--top", "2")
    assert result.returncode == 0, result.stderr
    assert_matches(json.loads(result.stdout), expected(records, top=2))


def test_empty_and_all_malformed_logs(tmp_path):
    for content, malformed in (("", 0), ("garbage\n{}\n", 2)):
        path = tmp_path / "log"
        path.write_text(content)
        result = run_cli(path, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["requests"] == 0 and report["malformed"] == malformed
        assert report["success_rate"] is None and report["latency_ms"]["p95"] is None
        assert report["busiest_hours"] == [] and report["top_error_codes"] == []
        assert run_cli(path).returncode == 0


def test_missing_file_is_an_error(tmp_path):
    result = run_cli(tmp_path / "nope.log")
    assert result.returncode == 2 and "cannot read" in result.stderr and not result.stdout


def test_undecodable_bytes_make_one_malformed_line(tmp_path):
    good = json.dumps({"ts": "2024-05-01T09:00:00Z", "status": 200, "duration_ms": 12.5})
    path = tmp_path / "log"
    path.write_bytes(good.encode() + b"\n\xff\xfe{bad\n" + good.encode() + b"\n")
    report = json.loads(run_cli(path, "--json").stdout)
    assert report["requests"] == 2 and report["malformed"] == 1
