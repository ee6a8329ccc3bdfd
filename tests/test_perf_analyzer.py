"""perf_analyzer 2.51.0 is obtained from pinned wheels, runs here, and accepts inputs built from the real images."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

from benchmarks.image_set import benchmark_images  # noqa: E402
from benchmarks.model_inputs import MODELS, model_requests  # noqa: E402
from benchmarks.triton_stats import model_stats, stats_delta  # noqa: E402
from ensemble import perf_analyzer as pa  # noqa: E402

SAMPLE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,\
Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,\
Avg latency,request/response,response wait
1,36.8864,142,1205,2152,226,21441,1528,5,25005,30939,33189,61448,26702,147,26484
2,48.8039,157,1979,16148,290,21489,631,4,37226,46294,59179,70267,40701,161,40473
"""


@pytest.fixture(scope="module")
def analyzer() -> pa.PerfAnalyzer:
    return pa.ensure_perf_analyzer()


def test_binary_is_obtained_and_reports_its_version(analyzer):
    assert analyzer.binary.is_file() and analyzer.lib_dir is not None
    assert (analyzer.lib_dir / "libcudart.so.12").is_file()
    assert analyzer.missing_libraries() == []
    assert "2.51.0" in analyzer.version()


def test_command_prefix_is_ready_to_run(analyzer):
    """The prefix alone (no environment from us) starts perf_analyzer: LD_LIBRARY_PATH travels inside it."""
    prefix = analyzer.prefix()
    assert prefix[0] == "env" and prefix[1].startswith("LD_LIBRARY_PATH=") and prefix[-1] == str(analyzer.binary)
    result = subprocess.run([*prefix, "--version"], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "2.51.0" in result.stdout + result.stderr


def test_second_call_reuses_the_cache(analyzer):
    before = analyzer.binary.stat().st_mtime_ns
    again = pa.ensure_perf_analyzer()
    assert again == analyzer
    assert again.binary.stat().st_mtime_ns == before


def test_cli_prints_the_prefix():
    result = subprocess.run([sys.executable, "-m", "ensemble.perf_analyzer"], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("bin/perf_analyzer")


def test_a_wheel_with_the_wrong_digest_is_rejected_and_removed(tmp_path, monkeypatch):
    """Whatever pip hands over is checked against the pinned sha256 before anything is extracted.

    Real pip, pointed by its own environment variables at a local folder holding a well-formed
    tritonclient 2.51.0 wheel that is not the published one.
    """
    wheel = pa.PinnedWheel(project="tritonclient", version="2.51.0", platform="manylinux1_x86_64",
                           filename="tritonclient-2.51.0-py3-none-manylinux1_x86_64.whl", sha256="0" * 64,
                           members={"x": "bin/x"})
    index, downloads = tmp_path / "index", tmp_path / "downloads"
    index.mkdir()
    downloads.mkdir()
    info = "tritonclient-2.51.0.dist-info"
    with zipfile.ZipFile(index / wheel.filename, "w") as archive:
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tritonclient\nVersion: 2.51.0\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                          "Tag: py3-none-manylinux1_x86_64\n")
        archive.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    with pytest.raises(pa.PerfAnalyzerError, match="does not match the pinned"):
        pa._download(wheel, downloads, log=lambda _: None)
    assert not (downloads / wheel.filename).exists()


def test_a_missing_library_is_reported_with_its_fix(tmp_path, analyzer):
    """Without the cache's lib directory the loader cannot find libcudart.so.12: the error names it."""
    bare = pa.PerfAnalyzer(analyzer.binary, lib_dir=tmp_path)
    if "libcudart.so.12" not in bare.missing_libraries():
        pytest.skip("libcudart.so.12 is on this machine's default library path")
    with pytest.raises(pa.PerfAnalyzerError, match="libcudart.so.12"):
        bare.check_libraries()


def test_input_data_holds_raw_bytes_and_shapes():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    blob = np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 2, 3)
    document = json.loads(json.dumps(pa.input_data([{"IMAGE": image}, {"IMAGE": image[:1], "X": blob}])))
    first, second = document["data"]
    assert first["IMAGE"]["shape"] == [2, 3, 3]
    assert base64.b64decode(first["IMAGE"]["content"]["b64"]) == image.tobytes()
    assert second["IMAGE"]["shape"] == [1, 3, 3]
    assert np.array_equal(np.frombuffer(base64.b64decode(second["X"]["content"]["b64"]), np.float32), blob.ravel())
    with pytest.raises(ValueError):
        pa.input_data([])


def test_csv_report_is_parsed(tmp_path):
    path = tmp_path / "report.csv"
    path.write_text(SAMPLE_CSV)
    rows = pa.parse_csv(path)
    assert [row["concurrency"] for row in rows] == [1, 2]
    assert rows[1]["throughput_infer_per_s"] == pytest.approx(48.8039)
    assert rows[0]["p99_latency_us"] == 61448 and rows[0]["server_queue_us"] == 2152
    path.write_text("Concurrency,Inferences/Second\n")
    with pytest.raises(pa.PerfAnalyzerError, match="no measurements"):
        pa.parse_csv(path)


# --- against the real server -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton(triton_server):
    """The session's tritonserver (tests/conftest.py)."""
    return triton_server


@pytest.fixture(scope="module")
def real_requests(reference_pipeline):
    return model_requests(benchmark_images(), reference_pipeline)


@pytest.mark.triton
@pytest.mark.parametrize("model", MODELS)
def test_real_image_input_data_is_accepted(model, triton, analyzer, real_requests, tmp_path):
    """Every request built from the real images goes through perf_analyzer and the server without an error."""
    requests = real_requests[model]
    input_file = pa.write_input_data(tmp_path / f"{model}.json", requests)
    report = tmp_path / "report.csv"
    before = model_stats(triton.http_url)
    # A fixed request count (each real input sent twice) keeps this to a few seconds and free of stability retries.
    result = analyzer.run(["-m", model, "-u", triton.grpc_url, "-i", "grpc", "-b", "1", "--input-data",
                           str(input_file), "--concurrency-range", "1:1", "--request-count", str(2 * len(requests)),
                           "-f", str(report)], timeout=120, check=False)
    served = stats_delta(before, model_stats(triton.http_url))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"with {len(requests)} step/steps" in result.stdout + result.stderr
    (row,) = pa.parse_csv(report)
    assert row["throughput_infer_per_s"] > 0
    assert served[model]["requests"] >= 2 * len(requests)
    assert {name: stats["failed_requests"] for name, stats in served.items()} == {name: 0 for name in served}
