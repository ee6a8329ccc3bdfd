"""The benchmarks run and write well-formed results (speed is never asserted)."""
from __future__ import annotations

import json

import numpy as np
import pytest


from benchmarks import bench_reference, bench_triton  # noqa: E402
from benchmarks.image_set import benchmark_images, describe  # noqa: E402


def test_image_set_is_real_fixed_and_deterministic():
    images = benchmark_images()
    assert len(images) == 10 and list(images)[:2] == ["grace_hopper", "astronaut"]
    for name, image in images.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 256, name
    assert describe(images)["sha256"] == describe(benchmark_images())["sha256"]


def test_reference_benchmark_writes_a_well_formed_result(tmp_path, model_repository):
    output = tmp_path / "reference.json"
    code = bench_reference.main(["--duration", "0.3", "--warmup-passes", "0", "--output", str(output),
                                 "--model-repository", str(model_repository)])
    assert code == 0
    document = json.loads(output.read_text())
    assert document["schema"] == bench_reference.SCHEMA and document["benchmark"] == "reference"
    machine = document["machine"]
    assert machine["usable_cores"] >= 1 and isinstance(machine["cpu_model"], str) and machine["cpu_model"]
    assert document["image_set"]["count"] == 10 and len(document["image_set"]["sha256"]) == 64
    results = document["results"]
    assert results["images"] >= 1 and results["requests"] >= 1 and results["elapsed_s"] > 0
    assert results["throughput_images_per_s"] > 0
    assert set(results["latency_per_request"]) == {"p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"}
    assert results["faces_per_image"] > 0  # every image of the set shows a face


def test_reference_benchmark_batches(model_repository):
    document = bench_reference.run(0.0, warmup_passes=0, batch_size=3, repository=model_repository, min_requests=1)
    assert document["results"]["requests"] == 1 and document["results"]["images"] == 3


@pytest.mark.parametrize("text, levels", [("1:4", [1, 2, 3, 4]), ("2:8:2", [2, 4, 6, 8]), ("1,3", [1, 3]),
                                          ("2", [2])])
def test_concurrency_ranges(text, levels):
    assert bench_triton.parse_concurrency(text) == levels


@pytest.mark.parametrize("text", ["0:2", "a:b", ""])
def test_bad_concurrency_ranges(text):
    with pytest.raises(Exception):
        bench_triton.parse_concurrency(text)


@pytest.fixture(scope="module")
def triton(request, model_repository, tmp_path_factory):
    """The session's tritonserver when conftest provides one, else one for this module."""
    try:
        yield request.getfixturevalue("triton_server")
        return
    except pytest.FixtureLookupError:
        pass
    from ensemble.triton.launcher import TritonServer

    log_file = tmp_path_factory.mktemp("bench-triton") / "tritonserver.log"
    with TritonServer(model_repository, log_file=log_file) as server:
        yield server


@pytest.mark.triton
def test_triton_benchmark_writes_a_well_formed_result(tmp_path, triton, model_repository):
    settings = bench_triton.Settings(measurement_interval_ms=500, stability_percentage=50, max_trials=3)
    document = bench_triton.run(models=["mask_detection"], concurrency=[1], settings=settings,
                                repository=model_repository, output_dir=tmp_path, budget_s=60, server=triton,
                                log=lambda _: None)
    assert json.loads((tmp_path / "triton.json").read_text()) == document
    assert document["perf_analyzer"]["version"].startswith("Perf Analyzer Version 2.51.0")
    (level,) = document["models"]["mask_detection"]["levels"]
    assert level["ok"], level.get("error")
    assert level["throughput_infer_per_s"] > 0
    for key in ("p50_latency_us", "p95_latency_us", "p99_latency_us", "server_queue_us", "server_compute_infer_us"):
        assert level[key] >= 0, key
    served = level["server_models"]
    assert {"mask_detection", "preprocess", "face_detector", "postprocess", "mask_classifier"} <= set(served)
    assert all(stats["failed_requests"] == 0 for stats in served.values())
