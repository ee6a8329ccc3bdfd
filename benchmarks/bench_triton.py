"""Triton throughput and latency: perf_analyzer over gRPC against the ensemble and each composing model.

Starts the embedded tritonserver (ensemble.triton.launcher), builds perf_analyzer `--input-data`
files from the benchmark image set (benchmarks/image_set.py, real inputs for every model, see
benchmarks/model_inputs.py), sweeps the concurrency, and writes one JSON document with
perf_analyzer's client-side figures (throughput, p50/p95/p99) and the server-side queue/compute
breakdown of every model that served requests (Triton's statistics API, so the ensemble's
composing models and the BLS-called classifier are included).

    python -m benchmarks.bench_triton                       # full sweep, bounded by --budget-s
    python -m benchmarks.bench_triton --models face_detector --concurrency 1:2

Each concurrency level is its own perf_analyzer run (1.5 s windows, stable when 3 windows agree
within 20 %, at most 5 windows), so a level that never stabilizes is recorded as such and the
others still count; an unstable level is re-measured once with a fixed request count and marked
"stable": false. The whole run is bounded by --budget-s (default 170 s, server start included):
later levels get fewer windows, then are skipped, rather than overrun it.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info, machine_line, results_dir, write_json
from benchmarks.cpu import CpuMeter, triton_session
from benchmarks.image_set import benchmark_images, describe
from benchmarks.model_inputs import ENSEMBLE, MODELS, model_requests
from benchmarks.triton_stats import model_stats, server_version, stats_delta
from ensemble.perf_analyzer import PerfAnalyzer, PerfAnalyzerError, ensure_perf_analyzer, parse_csv, write_input_data
from ensemble.reference import DEFAULT_REPOSITORY, ReferencePipeline
from ensemble.triton.launcher import TritonServer, TritonStartError

SCHEMA = "facemask.bench.triton/1"
RUN_OVERHEAD_S = 2.0  # perf_analyzer start-up, reading the input JSON, connecting, draining the last window
MIN_TRIALS = 3  # perf_analyzer judges stability over the last 3 windows
UNSTABLE = "Failed to obtain stable measurement"
WARM_UP_TIMEOUT_S = 60.0  # per request: a first inference can be slow, a wedged one must not hang the run


@dataclass(frozen=True)
class Settings:
    """perf_analyzer's measurement settings (a stable level takes 3 windows + ~2 s: 20 levels in ~2 minutes)."""

    measurement_interval_ms: int = 1500
    stability_percentage: float = 20.0
    max_trials: int = 5
    batch_size: int = 1
    protocol: str = "grpc"

    @property
    def interval_s(self) -> float:
        return self.measurement_interval_ms / 1000

    def level_s(self, trials: int) -> float:
        """How long one concurrency level takes with `trials` windows."""
        return trials * self.interval_s + RUN_OVERHEAD_S

    def arguments(self) -> list[str]:
        return ["-i", self.protocol, "-b", str(self.batch_size), "-p", str(self.measurement_interval_ms),
                "-s", f"{self.stability_percentage:g}"]


def parse_concurrency(text: str) -> list[int]:
    """"1:4" / "1:8:2" (start:end[:step], inclusive) or "1,2,4"."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            start, end, step = (parts + [1])[:3] if len(parts) == 2 else parts
            levels = list(range(start, end + 1, step))
        else:
            levels = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad concurrency {text!r}: use start:end[:step] or a,b,c") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"bad concurrency {text!r}: levels must be >= 1")
    return levels


def _perf_run(analyzer: PerfAnalyzer, args: list[str], timeout: float, log_file: Path) -> tuple[int | None, str]:
    """Run perf_analyzer; its exit code (None on timeout) and its output without the per-tensor chatter."""
    try:
        result = analyzer.run(args, timeout=timeout, check=False)
        returncode, output = result.returncode, result.stdout + "\n" + result.stderr
    except PerfAnalyzerError as exc:
        returncode, output = None, str(exc)
    output = "\n".join(line for line in output.splitlines() if not line.startswith("Checking tensor"))
    with open(log_file, "a") as log:
        log.write(f"$ perf_analyzer {' '.join(args)}\n{output}\n\n")
    return returncode, output


def measure(analyzer: PerfAnalyzer, *, grpc_url: str, http_url: str, model: str, input_file: Path,
            concurrency: int, settings: Settings, workdir: Path, trials: int | None = None,
            fallback: bool = True, cpu: CpuMeter | None = None) -> dict:
    """One concurrency level: perf_analyzer's CSV row plus every model's server-side statistics deltas.

    perf_analyzer first measures until `stability_percentage` holds over 3 windows (at most `trials`
    windows). If it never does (a busy machine), and `fallback`, one fixed-size measurement of about
    two windows' worth of requests is taken instead and the level is marked "stable": false.
    """
    trials = trials or settings.max_trials
    csv_file, log_file = workdir / f"{model}.c{concurrency}.csv", workdir / f"{model}.c{concurrency}.log"
    csv_file.unlink(missing_ok=True)
    log_file.unlink(missing_ok=True)
    common = ["-m", model, "-u", grpc_url, *settings.arguments(), "--input-data", str(input_file),
              "--concurrency-range", f"{concurrency}:{concurrency}", "-f", str(csv_file)]
    cpu = cpu or CpuMeter(None)
    before = model_stats(http_url)
    cpu.start()
    began = time.monotonic()
    returncode, output = _perf_run(analyzer, [*common, "-r", str(trials)], settings.level_s(trials) * 2 + 30,
                                   log_file)
    level = {"concurrency": concurrency, "stable": True, "trials_allowed": trials}
    unstable = returncode != 0 and UNSTABLE in output
    if unstable and not fallback:
        level["stable"] = False
        output += "\n(no time budget left for a fixed-count fallback measurement)"
    if unstable and fallback:
        served = stats_delta(before, model_stats(http_url)).get(model, {}).get("requests", 0)
        rate = served / max(time.monotonic() - began, 1e-3)
        count = max(8 * concurrency, round(rate * 2 * settings.interval_s))
        level.update(stable=False, request_count=count)
        returncode, output = _perf_run(analyzer, [*common, "--request-count", str(count)],
                                       settings.level_s(4) * 2 + 30, log_file)
    level["wall_s"] = round(time.monotonic() - began, 2)
    server_cpu_s = cpu.stop()
    level["server_models"] = stats_delta(before, model_stats(http_url))
    served = level["server_models"].get(model, {}).get("requests", 0)
    level["server_cpu_s"] = server_cpu_s
    level["server_cpu_ms_per_infer"] = round(server_cpu_s * 1e3 / served, 2) if server_cpu_s and served else None
    if returncode == 0 and csv_file.is_file():
        row = parse_csv(csv_file)[0]
        row.pop("concurrency", None)
        level.update(ok=True, **row)
    else:
        message = [line for line in output.splitlines() if line.strip()]
        level.update(ok=False, returncode=returncode, error="\n".join(message[-8:]))
    return level


def warm_up(grpc_url: str, model: str, requests: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Send every request once (first-inference costs stay out of the figures; bad inputs fail loudly here)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    with grpcclient.InferenceServerClient(grpc_url) as client:
        for request in requests:
            inputs = []
            for name, array in request.items():
                batch = np.ascontiguousarray(array)[np.newaxis]
                tensor = grpcclient.InferInput(name, list(batch.shape), np_to_triton_dtype(batch.dtype))
                tensor.set_data_from_numpy(batch)
                inputs.append(tensor)
            client.infer(model, inputs, client_timeout=WARM_UP_TIMEOUT_S)  # a wedged model fails, not hangs


def describe_requests(requests: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """What was sent: request count and, per input, dtype and the distinct shapes."""
    tensors = {}
    for request in requests:
        for name, array in request.items():
            entry = tensors.setdefault(name, {"dtype": str(array.dtype), "shapes": []})
            if list(array.shape) not in entry["shapes"]:
                entry["shapes"].append(list(array.shape))
    return {"requests": len(requests), "tensors": tensors}


class TritonSweep:
    """The Triton benchmark in steps, so another layer's levels can be interleaved with this one's.

    prepare(server) -> level(model, concurrency) ... -> finish() (writes <output_dir>/triton.json).
    The time budget counts this sweep's own steps only (input preparation, warm-ups, levels).
    """

    def __init__(self, *, models: Sequence[str] = MODELS, concurrency: Sequence[int] = (1, 2, 3, 4),
                 settings: Settings = Settings(), repository: Path = DEFAULT_REPOSITORY,
                 output_dir: Path | None = None, budget_s: float = 170.0, keep_inputs: bool = False, log=print,
                 model_concurrency: Mapping[str, Sequence[int]] | None = None):
        self.models, self.settings, self.repository = list(models), settings, Path(repository)
        self.budget_s, self.keep_inputs, self.log = budget_s, keep_inputs, log
        self.levels_of = {model: list((model_concurrency or {}).get(model, concurrency)) for model in models}
        self.output_dir = Path(output_dir) if output_dir else results_dir()
        self.workdir = self.output_dir / "triton"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.spent_s = 0.0
        self.server = None
        self.files: dict[str, Path] = {}
        self.requests: dict = {}
        self._warm: set[str] = set()
        self._cpu = CpuMeter(None)
        self.inputs_dir = self.workdir / "inputs" if keep_inputs else Path(tempfile.mkdtemp(prefix="perf-inputs-"))
        self.document = {
            "schema": SCHEMA,
            "benchmark": "triton",
            "description": "perf_analyzer (gRPC, sync, batch 1 per request) against the embedded tritonserver",
            "machine": machine_info(),
            "settings": {**asdict(settings), "concurrency": list(concurrency), "model_concurrency": self.levels_of,
                         "budget_s": budget_s, "model_repository": str(repository)},
            "models": {},
        }

    @property
    def remaining_s(self) -> float:
        return self.budget_s - self.spent_s

    def prepare(self, server, *, started_here: bool = False) -> None:
        """perf_analyzer, the --input-data files of every model, the server's facts."""
        began = time.monotonic()
        self.analyzer = ensure_perf_analyzer(log=self.log)
        images = benchmark_images()
        # Inputs come from the reference pipeline of the served repository (the canonical one for a partial one).
        reference = (self.repository if (self.repository / "postprocess" / "config.pbtxt").is_file()
                     else DEFAULT_REPOSITORY)
        self.requests = model_requests(images, ReferencePipeline(reference), tuple(self.models))
        self.files = {model: write_input_data(self.inputs_dir / f"{model}.json", self.requests[model])
                      for model in self.models}
        self.server = server
        self._cpu = CpuMeter(triton_session(server.grpc_url))
        startup_s = getattr(server, "startup_s", None)
        self.document.update(
            image_set=describe(images),
            perf_analyzer={"version": self.analyzer.version(), "binary": str(self.analyzer.binary)},
            server={"startup_s": startup_s and round(startup_s, 2), "grpc_url": server.grpc_url,
                    "started_here": started_here, "version": server_version(server.http_url)})
        for model in self.models:
            self.document["models"][model] = {"inputs": describe_requests(self.requests[model]), "levels": []}
        self.spent_s += time.monotonic() - began

    def level(self, model: str, concurrency: int) -> dict:
        """Measure one level (warming the model up first if this is its first), record it, log it."""
        began = time.monotonic()
        if model not in self._warm:
            warm_up(self.server.grpc_url, model, self.requests[model])
            self._warm.add(model)
        settings = self.settings
        # Fewer windows when the budget runs short; none below the 3 stability needs.
        remaining = self.budget_s - self.spent_s - (time.monotonic() - began)
        trials = min(settings.max_trials, int((remaining - RUN_OVERHEAD_S) / settings.interval_s))
        if trials < MIN_TRIALS:
            result = {"concurrency": concurrency, "ok": False, "skipped": "time budget spent"}
        else:
            fallback = remaining - settings.level_s(trials) > settings.level_s(3)
            result = measure(self.analyzer, grpc_url=self.server.grpc_url, http_url=self.server.http_url,
                             model=model, input_file=self.files[model], concurrency=concurrency,
                             settings=settings, workdir=self.workdir, trials=trials, fallback=fallback, cpu=self._cpu)
        self.document["models"][model]["levels"].append(result)
        self.log(level_line(model, result))
        self.spent_s += time.monotonic() - began
        return result

    def pending(self) -> list[tuple[str, int]]:
        """(model, concurrency) pairs not measured yet, in sweep order."""
        done = {(model, level["concurrency"]) for model, entry in self.document["models"].items()
                for level in entry["levels"]}
        return [(model, level) for model in self.models for level in self.levels_of[model]
                if (model, level) not in done]

    def finish(self) -> dict:
        if not self.keep_inputs:
            shutil.rmtree(self.inputs_dir, ignore_errors=True)
        self.document["elapsed_s"] = round(self.spent_s, 1)
        write_json(self.output_dir / "triton.json", self.document)
        return self.document


def run(*, models: Sequence[str] = MODELS, concurrency: Sequence[int] = (1, 2, 3, 4),
        settings: Settings = Settings(), repository: Path = DEFAULT_REPOSITORY, output_dir: Path | None = None,
        budget_s: float = 170.0, keep_inputs: bool = False, server=None, log=print,
        model_concurrency: Mapping[str, Sequence[int]] | None = None) -> dict:
    """The whole benchmark; returns the result document (also written to <output_dir>/triton.json).

    `server`: an already running TritonServer (anything with grpc_url, http_url, startup_s) serving
    `repository`; by default one is started for the run (its start counts against the budget).
    `model_concurrency`: levels for some models (e.g. a shorter sweep for the composing models);
    the others get `concurrency`.
    """
    sweep = TritonSweep(models=models, concurrency=concurrency, settings=settings, repository=repository,
                        output_dir=output_dir, budget_s=budget_s, keep_inputs=keep_inputs, log=log,
                        model_concurrency=model_concurrency)
    try:
        with ExitStack() as stack:
            started_here = server is None
            if started_here:
                began = time.monotonic()
                server = stack.enter_context(TritonServer(repository, log_file=sweep.workdir / "tritonserver.log"))
                sweep.spent_s += time.monotonic() - began
                log(f"tritonserver ready in {server.startup_s:.1f} s at {server.grpc_url}")
            sweep.prepare(server, started_here=started_here)
            for model, level in sweep.pending():
                sweep.level(model, level)
    finally:
        document = sweep.finish()
    return document


def level_line(model: str, level: dict) -> str:
    if not level.get("ok"):
        lines = (level.get("error") or "failed").splitlines() or ["failed"]
        return f"{model:16s} c={level['concurrency']}: no result ({level.get('skipped') or lines[-1].strip('()')})"
    own = level["server_models"].get(model, {})
    queue_us = level["server_queue_us"]
    if model == ENSEMBLE:  # the ensemble's own queue is ~0; its composing models' queues are what waits
        queue_us = sum(stats["queue_us"] or 0 for name, stats in level["server_models"].items() if name != model)
    flag = "" if level.get("stable", True) else "  (UNSTABLE: fixed-count fallback)"
    return (f"{model:16s} c={level['concurrency']}: {level['throughput_infer_per_s']:7.1f} infer/s  "
            f"p50 {level['p50_latency_us'] / 1e3:7.1f} ms  p95 {level['p95_latency_us'] / 1e3:7.1f} ms  "
            f"p99 {level['p99_latency_us'] / 1e3:7.1f} ms  queue {queue_us / 1e3:6.1f} ms  "
            f"compute {level['server_compute_infer_us'] / 1e3:6.1f} ms  batch {own.get('mean_batch_size')}"
            + (f"  cpu {level['server_cpu_ms_per_infer']:.0f} ms/infer" if level.get("server_cpu_ms_per_infer") else "")
            + flag)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_triton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Settings()
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--concurrency", type=parse_concurrency, default=[1, 2, 3, 4],
                        help="start:end[:step] or a,b,c (default 1:4)")
    parser.add_argument("--measurement-interval-ms", type=int, default=defaults.measurement_interval_ms)
    parser.add_argument("--stability-percentage", type=float, default=defaults.stability_percentage)
    parser.add_argument("--max-trials", type=int, default=defaults.max_trials)
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="wall-clock budget; levels that would overrun it are shortened or skipped (default 170)")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<timestamp>/")
    parser.add_argument("--keep-inputs", action="store_true", help="keep the --input-data JSON files")
    args = parser.parse_args(argv)

    models = [model.strip() for model in args.models.split(",") if model.strip()]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    settings = Settings(args.measurement_interval_ms, args.stability_percentage, args.max_trials)
    output_dir = args.results_dir or results_dir()
    try:
        document = run(models=models, concurrency=args.concurrency, settings=settings,
                       repository=args.model_repository, output_dir=output_dir, budget_s=args.budget_s,
                       keep_inputs=args.keep_inputs, log=lambda message: print(message, flush=True))
    except (PerfAnalyzerError, TritonStartError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"machine: {machine_line(document['machine'])}; {document['elapsed_s']:.0f} s in all")
    print(f"result: {output_dir / 'triton.json'}")
    failed = [(model, level["concurrency"]) for model, entry in document["models"].items()
              for level in entry["levels"] if not level.get("ok")]
    return 1 if failed and len(failed) == sum(len(e["levels"]) for e in document["models"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
