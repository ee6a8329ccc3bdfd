"""The benchmarks run and write well-formed results (speed is never asserted)."""
from __future__ import annotations

import argparse
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


def test_reference_slices_add_up_to_one_result(model_repository):
    meter = bench_reference.ReferenceMeter(warmup_passes=0, repository=model_repository)
    first = meter.measure(0.0, min_requests=2, label="a")
    second = meter.measure(0.0, min_requests=3, label="b")
    meter.close()
    document = meter.document()
    results = document["results"]
    assert [piece["label"] for piece in document["slices"]] == ["a", "b"]
    assert results["images"] == results["requests"] == first["images"] + second["images"] == 5
    assert results["elapsed_s"] == pytest.approx(first["elapsed_s"] + second["elapsed_s"], abs=0.002)
    assert results["throughput_images_per_s"] == pytest.approx(5 / results["elapsed_s"], rel=0.01)


@pytest.mark.parametrize("text, levels", [("1:4", [1, 2, 3, 4]), ("2:8:2", [2, 4, 6, 8]), ("1,3", [1, 3]),
                                          ("2", [2])])
def test_concurrency_ranges(text, levels):
    assert bench_triton.parse_concurrency(text) == levels


@pytest.mark.parametrize("text, why", [("0:2", "levels must be >= 1"), ("a:b", "use start:end"),
                                       ("", "use start:end"), ("3:1", "levels must be >= 1")])
def test_bad_concurrency_ranges(text, why):
    """argparse shows the ArgumentTypeError's message as the usage error, so it must say what is wrong."""
    with pytest.raises(argparse.ArgumentTypeError, match=f"bad concurrency {text!r}: {why}"):
        bench_triton.parse_concurrency(text)


def test_bad_concurrency_is_a_usage_error_naming_the_option(capsys):
    """A typo in --concurrency stops the run before it starts, with argparse's usage error saying why."""
    with pytest.raises(SystemExit) as exit_info:
        bench_main.parse_args(["--concurrency", "0:2"])
    assert exit_info.value.code == 2
    assert "argument --concurrency: bad concurrency '0:2': levels must be >= 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def triton(triton_server):
    """The session's tritonserver (tests/conftest.py)."""
    return triton_server


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


# --- the three-layer run: summary, ratios, markdown and plots -------------------------------------------

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import bench_gateway, report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reference_doc(rate: float, p50: float, spinning=None, beside: tuple[int, ...] = (1, 2, 4)) -> dict:
    """An in-process document whose slices beside each level in `beside` ran at the pooled `rate`."""
    from benchmarks.common import machine_info

    return {"schema": bench_reference.SCHEMA, "machine": machine_info(),
            "slices": [{"label": f"beside c={level}", "images": 10, "elapsed_s": 10 / rate,
                        "throughput_images_per_s": rate} for level in beside],
            "image_set": describe(benchmark_images()),
            "settings": {"ort_intra_op_threads": None, "ort_allow_spinning": spinning, "batch_size": 1},
            "results": {"throughput_images_per_s": rate, "requests": 100, "cpu_seconds_per_image": 0.05,
                        "latency_per_request": {"p50_ms": p50, "p95_ms": p50 * 1.2, "p99_ms": p50 * 1.5}}}


def _triton_doc(levels: dict[int, tuple[float, float]], failed: int = 0) -> dict:
    def level(concurrency, rate, p50):
        return {"concurrency": concurrency, "ok": True, "stable": concurrency != 4, "throughput_infer_per_s": rate,
                "p50_latency_us": p50 * 1e3, "p95_latency_us": p50 * 1.3e3, "p99_latency_us": p50 * 1.6e3,
                "server_cpu_ms_per_infer": 60.0,
                "server_models": {"mask_detection": {"failed_requests": failed, "mean_batch_size": 1.0}}}

    return {"perf_analyzer": {"version": "Perf Analyzer Version 2.51.0"}, "server": {"version": "2.51.0"},
            "models": {"mask_detection": {"levels": [level(c, *v) for c, v in levels.items()]
                                          + [{"concurrency": 8, "ok": False, "skipped": "time budget spent"}]}}}


def _gateway_doc(levels: dict[int, tuple[float, float]], non2xx: int = 0, transport: str | None = None,
                 gateway_cpu_ms: float = 10.0) -> dict:
    return {"wrk": {"version": "wrk 4.1.0"}, "bodies": {"jpeg_quality": 95, "mean_bytes": 1000},
            "gateway": {"workers": 2, "threads": 4, **({"triton_shared_memory": transport} if transport else {})},
            "server_timing_c1": {"requests": 20, "p50_ms": {"decode": 3.0, "inference": 60.0, "total": 65.0},
                                 "direct_grpc_p50_ms": 59.0, "paired_added_p50_ms": 6.5,
                                 "paired_added_p50_ci95_ms": [5.9, 7.2]},
            "levels": [{"concurrency": c, "ok": True, "throughput_rps": rate, "p50_ms": p50, "p95_ms": p50 * 1.3,
                        "p99_ms": p50 * 1.6, "requests": 100, "error_count": non2xx if c == 2 else 0,
                        "gateway_cpu_ms_per_request": gateway_cpu_ms, "triton_cpu_ms_per_request": 60.0}
                       for c, (rate, p50) in levels.items()]}


def test_summary_ratios_against_targets():
    references = [_reference_doc(20.0, 50.0), _reference_doc(25.0, 40.0, spinning=False)]
    triton = _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0), 4: (26.0, 150.0)})
    gateway = _gateway_doc({1: (14.0, 66.0), 2: (22.5, 88.0), 4: (22.0, 180.0)})
    summary = report.summarize(references, triton, gateway, uptime_start="up, load average: 0.1, 0.2, 0.3",
                               uptime_end="up, load average: 1.0, 0.5, 0.3")
    ratios = summary["ratios"]
    # the ceiling is the faster in-process configuration; each server layer at its own best concurrency
    assert summary["layers"]["in_process"]["best"]["variant"] == "spinning off"
    # Triton's c=4 (26/s) did not stabilise: the best is the stable c=2
    assert ratios["triton_vs_in_process"]["value"] == pytest.approx(24 / 25, abs=1e-3)
    assert ratios["triton_vs_in_process"]["met"]
    # ... but the gateway is held to the faster unstable c=4: the stricter of the two denominators
    assert ratios["gateway_vs_triton"]["value"] == pytest.approx(22.5 / 26, abs=1e-3)
    assert ratios["gateway_vs_triton"]["met"] and "could not call stable" in ratios["gateway_vs_triton"]["detail"]
    assert ratios["gateway_vs_triton"]["at_triton_best_concurrency"] == pytest.approx(22 / 26, abs=1e-3)
    assert ratios["gateway_added_p50_ms_c1"]["value"] == pytest.approx(4.0)
    assert not ratios["gateway_added_p50_ms_c1"]["met"]  # 4 ms > 3 ms
    assert ratios["gateway_added_p50_ms_c1"]["paired_value"] == 6.5
    assert ratios["gateway_added_p50_ms_c1"]["paired_ci95"] == [5.9, 7.2]
    assert "+6.50 ms (95% interval 5.90–7.20)" in ratios["gateway_added_p50_ms_c1"]["detail"]
    # Within the target by the sweeps (2 ms) but not paired (6.5 ms): not met.
    close = report.summarize(references, triton, _gateway_doc({1: (14.0, 64.0), 2: (22.5, 88.0)}))
    assert close["ratios"]["gateway_added_p50_ms_c1"]["value"] == pytest.approx(2.0)
    assert not close["ratios"]["gateway_added_p50_ms_c1"]["met"]
    assert ratios["errors"] == {**ratios["errors"], "value": 0, "met": True}  # a skipped level is not an error
    assert summary["triton_unstable_levels"] == [4]

    failing = report.summarize(references, _triton_doc({1: (10.0, 90.0)}, failed=2),
                               _gateway_doc({1: (5.0, 99.0), 2: (8.0, 150.0)}, non2xx=3))
    assert failing["ratios"]["errors"]["value"] == 5 and not failing["ratios"]["errors"]["met"]
    assert not failing["ratios"]["triton_vs_in_process"]["met"] and not failing["ratios"]["gateway_vs_triton"]["met"]

    # nothing measured is reported as such, and not met
    only_reference = report.summarize(references)
    assert set(only_reference["ratios"]) == {"triton_vs_in_process", "gateway_vs_triton", "gateway_added_p50_ms_c1",
                                             "errors"}
    for key in ("triton_vs_in_process", "gateway_vs_triton", "gateway_added_p50_ms_c1"):
        entry = only_reference["ratios"][key]
        assert entry["value"] is None and not entry["met"] and entry["detail"].startswith("not measured")
    assert "not measured" in "\n".join(report.ratio_lines(only_reference))


def _with_paired(gateway: dict, added_ms: float, interval: list[float]) -> dict:
    gateway["server_timing_c1"].update(paired_added_p50_ms=added_ms, paired_added_p50_ci95_ms=interval,
                                       direct_transport="system")
    return gateway


def test_added_latency_is_met_only_when_the_paired_interval_lies_within_the_target():
    references = [_reference_doc(25.0, 40.0)]
    triton = _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)})
    within = report.summarize(references, triton,
                              _with_paired(_gateway_doc({1: (14.0, 64.0)}, transport="system"), 2.6, [2.3, 2.9]))
    entry = within["ratios"]["gateway_added_p50_ms_c1"]
    assert entry["met"] and entry["paired_direct_transport"] == "system"
    assert "same frame sent straight to Triton, shared memory): +2.60 ms" in entry["detail"]
    straddling = report.summarize(references, triton,
                                  _with_paired(_gateway_doc({1: (14.0, 64.0)}, transport="system"), 2.6, [2.3, 3.2]))
    assert not straddling["ratios"]["gateway_added_p50_ms_c1"]["met"]  # the median may well be above 3 ms
    # a results folder from before the pairing followed the gateway's transport: its direct call sent inline
    unpaired = _with_paired(_gateway_doc({1: (14.0, 64.0)}, transport="system"), 2.6, [2.3, 2.9])
    del unpaired["server_timing_c1"]["direct_transport"]
    entry = report.summarize(references, triton, unpaired)["ratios"]["gateway_added_p50_ms_c1"]
    assert not entry["met"] and entry["paired_direct_transport"] == "off"
    assert "while the gateway sent shared memory: not like for like, so not met" in entry["detail"]


def test_a_level_with_errors_gives_no_latency_comparison():
    """A fast 429 (or a timed-out request wrk leaves out of its histogram) would pull the level's percentiles."""
    references = [_reference_doc(25.0, 40.0)]
    triton = _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)})
    gateway = _with_paired(_gateway_doc({1: (14.0, 63.0)}), 1.0, [0.8, 1.2])
    gateway["levels"][0]["error_count"] = 4
    entry = report.summarize(references, triton, gateway)["ratios"]["gateway_added_p50_ms_c1"]
    assert entry["value"] is None and not entry["met"]
    assert entry["detail"] == "not measured: gateway had 4 failed requests at c=1"
    failing = report.summarize(references, _triton_doc({1: (15.0, 62.0)}, failed=1), _gateway_doc({1: (14.0, 63.0)}))
    assert failing["ratios"]["gateway_added_p50_ms_c1"]["detail"] == "not measured: Triton had 1 failed requests at c=1"


def test_triton_against_in_process_is_not_met_without_a_slice_beside_its_best_level():
    """An old results folder, or a ceiling measured up front: the minute it saw may not be Triton's."""
    entry = report.summarize([_reference_doc(25.0, 40.0, beside=())], _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)})
                             )["ratios"]["triton_vs_in_process"]
    assert entry["value"] == pytest.approx(24 / 25, abs=1e-3) and not entry["met"]
    assert "no in-process slice was measured beside c=2" in entry["detail"]


def test_triton_is_also_compared_with_the_in_process_slice_measured_beside_its_best_level():
    sliced = _reference_doc(25.0, 40.0, spinning=False)
    sliced["slices"] = [{"label": "beside c=1", "images": 75, "elapsed_s": 3.0, "throughput_images_per_s": 25.0},
                        {"label": "beside c=2", "images": 96, "elapsed_s": 3.0, "throughput_images_per_s": 32.0}]
    triton = _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)})
    entry = report.summarize([sliced], triton)["ratios"]["triton_vs_in_process"]
    assert entry["value"] == pytest.approx(24 / 25, abs=1e-3)  # against the whole run's ceiling
    assert entry["paired_value"] == pytest.approx(24 / 32, abs=1e-3)  # against the slice beside c=2
    assert not entry["met"] and "beside c=2 (32.00/s): 0.750" in entry["detail"]


def test_a_failure_inside_the_ensemble_counts_once_not_once_per_model_it_reached():
    triton = _triton_doc({1: (15.0, 62.0)}, failed=1)
    level = triton["models"]["mask_detection"]["levels"][0]
    level["server_models"].update({"face_detector": {"failed_requests": 1}, "postprocess": {"failed_requests": 1}})
    assert report.summarize([_reference_doc(20.0, 50.0)], triton)["ratios"]["errors"]["value"] == 1


def test_both_gateway_transports_are_compared_and_the_default_carries_the_ratios(tmp_path):
    """Shared memory vs pixels in gRPC side by side: the default's figures make the ratios, both count errors."""
    triton = _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)})
    shared = _gateway_doc({1: (14.0, 66.0), 2: (21.0, 88.0)}, transport="system", gateway_cpu_ms=8.0)
    inline = _gateway_doc({1: (13.0, 70.0), 2: (20.0, 95.0)}, non2xx=2, transport="off", gateway_cpu_ms=11.0)
    summary = report.summarize([_reference_doc(20.0, 50.0)], triton, [shared, inline])

    assert summary["ratios"]["gateway_vs_triton"]["value"] == pytest.approx(21 / 24, abs=1e-3)
    assert summary["ratios"]["errors"]["value"] == 2  # the alternative's errors count too
    comparison = summary["transport_comparison"]
    assert comparison["default"] == "system" and comparison["faster"] == "system"
    assert comparison["throughput_ratio"] == pytest.approx(21 / 20, abs=1e-3)
    assert comparison["transports"]["off"] == {"best_throughput": 20.0, "best_concurrency": 2, "p50_ms_c1": 70.0,
                                               "gateway_cpu_ms_per_request": 11.0, "paired_added_p50_ms_c1": 6.5}
    labels = [row[0] for row in report.table_rows(summary)]
    assert labels.count("gateway [shared memory]") == 2 and labels.count("gateway [pixels in gRPC]") == 2
    assert "faster: shared memory" in report.console_table(summary)
    report.write_report(summary, tmp_path)
    assert "| pixels in gRPC | 20.0 (2) | 70.0 | 6.50 | 11.0 |" in (tmp_path / "summary.md").read_text()

    # a results folder can be re-reported: the default's document first, then the alternative's
    for name, document in (("reference.json", _reference_doc(20.0, 50.0)), ("gateway.json", shared),
                           ("gateway-off.json", inline)):
        (tmp_path / name).write_text(json.dumps(document))
    _, _, gateways = report.load_documents(tmp_path)
    assert [document["gateway"]["triton_shared_memory"] for document in gateways] == ["system", "off"]
    assert report.summarize([_reference_doc(20.0, 50.0)], triton, shared)["transport_comparison"] is None


def test_the_paired_interval_brackets_the_median_and_narrows_with_more_pairs():
    rng = np.random.default_rng(7)
    few, many = rng.normal(3.0, 2.0, 20), rng.normal(3.0, 2.0, 500)
    for samples in (few, many):
        low, high = bench_gateway.median_interval(samples)
        assert low <= float(np.median(samples)) <= high
    few_width = np.subtract(*bench_gateway.median_interval(few)[::-1])
    many_width = np.subtract(*bench_gateway.median_interval(many)[::-1])
    # the median's standard error falls as 1/sqrt(n): 25x the pairs, about a fifth of the width
    assert many_width < few_width / 3
    assert bench_gateway.median_interval(np.full(30, 2.5)) == (2.5, 2.5)


def test_the_run_s_bound_caps_every_sweep_s_budget():
    """One deadline for the whole run: a run that fell behind (a slow server start, a busy machine) shrinks what
    each sweep has left, so its levels are shortened or skipped instead of running past 10 minutes."""
    from types import SimpleNamespace

    limit = bench_main.RUN_BOUND_S - bench_main.FINISH_RESERVE_S
    triton, gateway = SimpleNamespace(budget_s=200.0, spent_s=50.0), SimpleNamespace(budget_s=100.0, spent_s=0.0)
    bench_main._cap_budgets([triton, gateway], SimpleNamespace(elapsed_s=limit - 30.0))
    assert (triton.budget_s, gateway.budget_s) == (80.0, 30.0)  # 30 s of the run left for each, beyond what it spent
    bench_main._cap_budgets([triton, gateway], SimpleNamespace(elapsed_s=60.0))
    assert (triton.budget_s, gateway.budget_s) == (80.0, 30.0)  # never grown back
    bench_main._cap_budgets([triton, gateway], SimpleNamespace(elapsed_s=limit + 5.0))
    assert (triton.budget_s, gateway.budget_s) == (50.0, 0.0)  # past the deadline: nothing more to spend


def test_stolen_cpu_time_is_the_share_of_the_machine_s_time_during_the_run():
    from benchmarks.common import cpu_times, steal_during

    assert steal_during({"total": 100.0, "idle": 50.0, "steal": 1.0}, {"total": 300.0, "idle": 90.0, "steal": 5.0}) \
        == {"seconds": 4.0, "share": 0.02}
    assert steal_during(None, {"total": 1.0, "idle": 0.0, "steal": 0.0}) is None
    now = cpu_times()  # the real /proc/stat: counters that only grow
    assert now["total"] >= now["idle"] >= 0 and now["steal"] >= 0


def test_report_writes_json_markdown_and_plots(tmp_path):
    summary = report.summarize([_reference_doc(20.0, 50.0)], _triton_doc({1: (15.0, 62.0), 2: (24.0, 80.0)}),
                               _gateway_doc({1: (14.0, 66.0), 2: (22.5, 88.0)}))
    paths = report.write_report(summary, tmp_path)
    assert json.loads(paths["json"].read_text())["ratios"]["gateway_vs_triton"]["value"] == pytest.approx(0.938)
    text = paths["markdown"].read_text()
    assert "| triton_vs_in_process |" in text and "![throughput](throughput.png)" in text
    assert "| gateway | 2 | 22.5 |" in text
    assert "added latency in these pairs: 6.5 ms, 95% bootstrap interval 5.9–7.2 ms (20 pairs)" in text
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    table = report.console_table(summary)
    assert "gateway / Triton-direct" in table and "uptime at start" in table


def test_wrk_result_line_is_parsed():
    raw = bench_gateway.parse_wrk(
        'Running 1s test\nWRK_RESULT {"requests": 10, "duration_us": 1000000, "bytes": 5, "non2xx": 1, '
        '"non2xx_codes": "503", "errors": {"connect": 0, "read": 0, "write": 0, "status": 1, "timeout": 2}, '
        '"latency_us": {"min": 1000, "max": 9000, "mean": 5000.0, "stdev": 1.0, "p50": 5000, "p90": 8000, '
        '"p95": 8500, "p99": 9000}}\n')
    level = bench_gateway.level_result(3, raw, {}, {"gateway": 0.1, "triton": None})
    assert level["ok_requests"] == 9 and level["throughput_rps"] == pytest.approx(9.0)
    assert level["error_count"] == 3  # one non-2xx answer and two timeouts; wrk's "status" is one of the non-2xx
    assert level["p50_ms"] == 5.0 and level["p99_ms"] == 9.0
    assert level["gateway_cpu_ms_per_request"] == 10.0 and "triton_cpu_ms_per_request" not in level
    with pytest.raises(bench_gateway.GatewayBenchError):
        bench_gateway.parse_wrk("no result here")


@pytest.mark.triton
def test_three_layer_run_writes_summary_markdown_and_plots(tmp_path, triton, model_repository):
    """A tiny `python -m benchmarks` run: both reference configurations, one Triton level, one gateway level."""
    try:
        bench_gateway.find_wrk()
    except bench_gateway.GatewayBenchError as exc:
        pytest.fail(str(exc))
    args = bench_main.parse_args([
        "--reference-duration", "0.4", "--concurrency", "1", "--component-concurrency", "none",
        "--measurement-interval-ms", "1000", "--triton-budget-s", "40", "--gateway-budget-s", "30",
        "--gateway-duration", "1", "--gateway-warmup", "0", "--paired-passes", "2", "--workers", "1",
        "--threads", "2",
        "--model-repository", str(model_repository), "--results-dir", str(tmp_path)])
    lines = []
    summary = bench_main.run(args, server=triton, out=lines.append)

    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for name in ("reference.json", "reference-nospin.json", "triton.json", "gateway.json", "gateway-off.json",
                 "summary.md"):
        assert (tmp_path / name).is_file(), name
    for name in ("throughput.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    machine = summary["machine"]
    assert machine["usable_cores"] >= 1 and machine["cpu_model"] and "gpus" in machine
    assert "load average" in summary["uptime_start"] and summary["versions"]["wrk"]
    assert summary["cpu_steal"]["seconds"] >= 0 and 0 <= summary["cpu_steal"]["share"] <= 1
    assert summary["versions"]["tritonserver"] == "2.51.0"

    gateway = json.loads((tmp_path / "gateway.json").read_text())
    assert gateway["schema"] == bench_gateway.SCHEMA and gateway["gateway"]["workers"] == 1
    assert gateway["gateway"]["triton_shared_memory"] == "system"  # the default first, then the alternative
    inline = json.loads((tmp_path / "gateway-off.json").read_text())["gateway"]
    assert inline["triton_shared_memory"] == "off"
    # checked against Triton, not taken from the label: only the shared-memory gateway registered regions
    assert gateway["gateway"]["shared_memory_regions"] >= 1 and inline["shared_memory_regions"] == 0
    (level,) = gateway["levels"]
    assert level["ok"] and level["requests"] >= 1 and level["throughput_rps"] > 0
    assert level["error_count"] == 0 and level["errors"]["non2xx"] == 0
    assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    assert level["server_models"]["mask_detection"]["requests"] >= level["requests"]
    timing = gateway["server_timing_c1"]
    assert timing["faces_per_image"] >= 1 and timing["p50_ms"]["decode"] > 0 and timing["requests"] == 2 * 10
    low, high = timing["paired_added_p50_ci95_ms"]
    assert low <= timing["paired_added_p50_ms"] <= high

    assert set(summary["layers"]) == {"in_process", "triton", "gateway", "gateway_alternative"}
    assert set(summary["transport_comparison"]["transports"]) == {"system", "off"}
    assert len(summary["layers"]["in_process"]["levels"]) == 2
    # both in-process configurations (the faster is the ceiling) are measured between the server levels
    for name in ("reference-nospin.json", "reference.json"):
        assert [piece["label"] for piece in json.loads((tmp_path / name).read_text())["slices"]] == ["beside c=1"]
    # the paired direct call sends its pixels the way the gateway under test does
    assert timing["direct_transport"] == "system"
    assert json.loads((tmp_path / "gateway-off.json").read_text())["server_timing_c1"]["direct_transport"] == "off"
    assert any(line.startswith("[") and "in-process slice beside c=1:" in line for line in lines)
    assert {"triton_vs_in_process", "gateway_vs_triton", "gateway_added_p50_ms_c1", "errors"} <= set(summary["ratios"])
    # In a run this short perf_analyzer may find no three windows that agree on a busy machine (seen in a run
    # beside other work): the Triton level is then kept as unstable and the ratios it feeds say "not measured".
    (triton_level,) = json.loads((tmp_path / "triton.json").read_text())["models"]["mask_detection"]["levels"]
    assert triton_level["ok"] and triton_level["throughput_infer_per_s"] > 0
    for name, ratio in summary["ratios"].items():
        assert isinstance(ratio["met"], bool)
        if triton_level["stable"] or name == "errors":
            assert ratio["value"] is not None, name
        else:
            assert ratio["value"] is None and not ratio["met"] and ratio["detail"] == "not measured: no stable Triton " \
                f"level{' at c=1' if name == 'gateway_added_p50_ms_c1' else ''}", name
    text = (tmp_path / "summary.md").read_text()
    assert "## Ratios against the targets" in text and "| gateway [shared memory] | 1 |" in text
    assert "| gateway [pixels in gRPC] | 1 |" in text
    assert any("gateway / Triton-direct" in line for line in lines)  # the console table was printed
    assert any("=== Triton direct (perf_analyzer, gRPC) and gateway" in line for line in lines)  # progress
    assert any(line.startswith("[") and "gateway[shm] c=1:" in line for line in lines)
    assert any(line.startswith("[") and "gateway[inline] c=1:" in line for line in lines)


def test_config_variant_rewrites_only_the_edited_configs(tmp_path, model_repository):
    from benchmarks.config_variant import make_variant
    from ensemble.triton.config import load_config, string_parameters

    canonical = (model_repository / "face_detector" / "config.pbtxt").read_text()
    dest = make_variant(tmp_path / "variant", source=model_repository, merges=[
        'face_detector:parameters { key: "intra_op_thread_count" value { string_value: "1" } }',
        "face_detector:dynamic_batching { max_queue_delay_microseconds: 500 }",
        "face_detector:instance_group { count: 2 kind: KIND_CPU }"], clears=["face_detector:instance_group"])
    config = load_config(dest / "face_detector")
    assert string_parameters(config)["intra_op_thread_count"] == "1"
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]  # untouched fields stay
    assert [(group.count, group.kind) for group in config.instance_group] == [(2, 2)]  # KIND_CPU
    assert (dest / "face_detector" / "1" / "model.onnx").is_symlink()
    assert (dest / "mask_classifier" / "config.pbtxt").is_symlink()  # not edited: a link to the original
    assert (model_repository / "face_detector" / "config.pbtxt").read_text() == canonical
    with pytest.raises(ValueError):
        make_variant(tmp_path / "bad", source=model_repository, merges=["no_such_model:max_batch_size: 1"])


def test_the_decode_benchmark_compares_the_three_ways_on_camera_sizes():
    from benchmarks import bench_decode

    document = bench_decode.run(rounds=1, log=lambda _: None)
    frames = document["frames"]
    assert list(frames) == ["1080p", "1440p", "4K"]
    assert [frame["reduction"] for frame in frames.values()] == [1, 2, 2]  # 1080p is under 2 x max_side 1280
    assert frames["4K"]["sent"] == [720, 1280]  # both ways send the same downscaled frame (checked in run)
    for frame in frames.values():
        assert set(frame["median_ms"]) == {"full_decode", "area_shrink", "scaled_decode"}
        assert frame["ratio"] > 0 and frame["ratio_to_area_shrink"] > 0
    decoders = document["decoders"]  # run() checked that the gateway decoded every one with TurboJPEG
    assert list(decoders) == ["bench bodies (q95)", "1080p", "1440p", "4K"]
    assert decoders["bench bodies (q95)"]["images"] == 10
    assert all(set(entry["median_ms_per_image"]) == {"opencv", "turbojpeg"} and entry["ratio"] > 0
               for entry in decoders.values())
