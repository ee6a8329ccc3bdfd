"""`python -m benchmarks` (what `make bench` runs): the same image set through three layers, one results folder.

  1. in-process: ReferencePipeline (ONNX Runtime, no server) — the ceiling;
  2. Triton direct: perf_analyzer over gRPC against mask_detection (concurrency sweep), plus a short
     sweep of each composing model;
  3. gateway: wrk over HTTP against gunicorn + Flask in front of the same tritonserver (same sweep),
     once per way the pixels can reach Triton: system shared memory and inside the gRPC request.

One tritonserver serves layers 2 and 3, and their levels are measured alternately (Triton c=1, gateway
c=1 [shm], gateway c=1 [inline], gateway c=2 [inline], ...) so other load on the machine affects all
alike; both in-process configurations are measured in slices between them, one each per level.
Every phase has a time budget: the defaults take about 5 minutes on a 2-core machine, the planned
bound (printed on every progress line) is 7:40, and a level already running can overrun it by its own
length only.

    python -m benchmarks                                 # everything, default budgets
    python -m benchmarks --quick                         # ~1.5 minutes: fewer levels, shorter windows
    python -m benchmarks --concurrency 1,2,4 --component-concurrency none --skip-gateway

Results: benchmarks/results/<timestamp>/ — summary.json (machine facts, versions, every layer,
the ratios against the targets), summary.md, throughput.png, latency.png, reference.json,
reference-nospin.json, triton.json, gateway.json (the gateway's default transport), gateway-<transport>.json
(the other) and the raw tool output under triton/ and gateway/.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from benchmarks import bench_gateway, bench_reference, bench_triton, report
from benchmarks.common import cpu_times, results_dir, steal_during, uptime_line, write_json
from benchmarks.model_inputs import ENSEMBLE, MODELS
from ensemble.perf_analyzer import PerfAnalyzerError
from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.launcher import TritonServer, TritonStartError

# The in-process ceiling is the faster of ONNX Runtime's defaults and the same with spin-waiting off
# (on 2 shared cores ORT's spinning worker threads can halve the rate); each gets half the reference time.
REFERENCE_VARIANTS = (("reference", None), ("reference-nospin", False))
SERVER_START_ALLOWANCE_S = 20.0  # tritonserver start (typically 3-15 s on 2 cores), for the printed estimate
REPORT_ALLOWANCE_S = 10.0  # model loading for the reference run, the report and plots
RUN_BOUND_S = 600.0  # the issue's bound on the whole run: the sweeps' budgets shrink to keep within it
# Kept back from the sweeps for what follows them in the worst case: stopping two gunicorns (25 s each) and
# tritonserver (40 s), then the report.
FINISH_RESERVE_S = 2 * 25.0 + 40.0 + REPORT_ALLOWANCE_S


def _cap_budgets(sweeps, progress: "Progress") -> None:
    """Shrink each sweep's budget to what is left of RUN_BOUND_S less FINISH_RESERVE_S: one deadline for the run,
    reached by shortening, then skipping levels (each sweep's own rule), not by running over."""
    left_s = RUN_BOUND_S - FINISH_RESERVE_S - progress.elapsed_s
    for sweep in sweeps:
        sweep.budget_s = min(sweep.budget_s, sweep.spent_s + max(0.0, left_s))


class Progress:
    """Log lines prefixed with the elapsed time, the phase and what is left of the planned time."""

    def __init__(self, planned_s: float, phases: int, out: Callable[[str], None] = print):
        self.started = time.monotonic()
        self.planned_s = planned_s
        self.phases = phases
        self.phase = 0
        self.name = ""
        self.out = out

    @staticmethod
    def clock(seconds: float) -> str:
        seconds = max(0, int(round(seconds)))
        return f"{seconds // 60}:{seconds % 60:02d}"

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def begin(self, name: str, detail: str = "") -> None:
        self.phase += 1
        self.name = name
        self.log(f"=== {name}{': ' + detail if detail else ''}")

    def log(self, message: str) -> None:
        elapsed = self.elapsed_s
        share = min(elapsed / self.planned_s, 0.99) if self.planned_s else 0
        bar = "#" * int(share * 20)
        self.out(f"[{bar:<20}] {self.clock(elapsed)} / ≤{self.clock(self.planned_s)}  "
                 f"{self.phase}/{self.phases} {message}")


def _levels(text: str) -> list[int]:
    return [] if text.strip().lower() in ("", "none", "0") else bench_triton.parse_concurrency(text)


def _at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _transports(text: str) -> list[str]:
    """The transports to sweep, the gateway's default first: its figures are the `gateway` layer."""
    from gateway.settings import SHARED_MEMORY_CHOICES

    default = bench_gateway.default_transport()
    chosen = [part.strip() for part in text.split(",") if part.strip()] or list(SHARED_MEMORY_CHOICES)
    unknown = [part for part in chosen if part not in SHARED_MEMORY_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"{unknown} not in {', '.join(SHARED_MEMORY_CHOICES)}")
    return sorted(dict.fromkeys(chosen), key=lambda transport: transport != default)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (~1.5 min): 6 s reference, levels 1,2,4, no composing models, "
                             "1.5 s perf_analyzer windows, 3 s gateway levels")
    parser.add_argument("--reference-duration", type=float,
                        help="measured in-process seconds, split between ORT defaults and spinning off (default 30)")
    parser.add_argument("--reference-defaults-only", action="store_true",
                        help="measure the in-process pipeline with ONNX Runtime's defaults only")
    parser.add_argument("--concurrency", type=bench_triton.parse_concurrency,
                        help="levels for mask_detection and the gateway (default 1,2,3,4,6)")
    parser.add_argument("--component-concurrency", type=_levels,
                        help="levels for the composing models, 'none' to skip them (default 1,2)")
    parser.add_argument("--models", default=",".join(MODELS), help="Triton models to drive (default all five)")
    parser.add_argument("--triton-budget-s", type=float, help="budget of the Triton sweep (default 200)")
    parser.add_argument("--gateway-budget-s", type=float, help="budget of the gateway sweep (default 100)")
    parser.add_argument("--gateway-duration", type=int, help="wrk seconds per level (default 10)")
    parser.add_argument("--gateway-warmup", type=int, default=2, help="unmeasured wrk seconds first (default 2)")
    parser.add_argument("--paired-passes", type=_at_least_one,
                        help="passes over the image set for the gateway's paired c=1 breakdown (default 10)")
    parser.add_argument("--measurement-interval-ms", type=int, help="perf_analyzer window (default 2500)")
    parser.add_argument("--workers", type=int, help="gunicorn workers (default: the gateway's own default)")
    parser.add_argument("--threads", type=int, help="threads per gunicorn worker (default: the gateway's)")
    parser.add_argument("--gateway-shared-memory", type=_transports,
                        help="GATEWAY_TRITON_SHARED_MEMORY values to sweep, the gateway's default first "
                             "(default: system,off, i.e. both side by side)")
    parser.add_argument("--skip-triton", action="store_true", help="no perf_analyzer sweep")
    parser.add_argument("--skip-gateway", action="store_true", help="no gateway sweep")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<timestamp>/")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"reference_duration": 6.0 if quick else 30.0, "concurrency": [1, 2, 4] if quick else [1, 2, 3, 4, 6],
                "component_concurrency": [] if quick else [1, 2], "triton_budget_s": 60.0 if quick else 200.0,
                "gateway_budget_s": 35.0 if quick else 100.0, "gateway_duration": 3 if quick else 10,
                "measurement_interval_ms": 1500 if quick else 2500,
                "paired_passes": 2 if quick else 10, "gateway_shared_memory": _transports("")}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def _reference_slice(meter: bench_reference.ReferenceMeter, seconds: float, level: int, progress: Progress) -> None:
    piece = meter.measure(seconds, label=f"beside c={level}")  # before it, or after it on alternate levels
    progress.log(f"in-process slice {piece['label']}: {piece['throughput_images_per_s']:.1f} images/s "
                 f"({piece['images']} in {piece['elapsed_s']:.1f} s)")


def run(args: argparse.Namespace, *, server=None, out: Callable[[str], None] = print) -> dict:
    """All layers into args.results_dir (or a new timestamped folder); returns the summary document.

    `server`: a running TritonServer to use for layers 2 and 3 instead of starting one (tests).
    """
    output_dir = args.results_dir or results_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    models = [model.strip() for model in args.models.split(",") if model.strip()]
    if not args.component_concurrency:
        models = [model for model in models if model == ENSEMBLE]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; known: {', '.join(MODELS)}")
    servers = not (args.skip_triton and args.skip_gateway)
    planned = (args.reference_duration + REPORT_ALLOWANCE_S + (SERVER_START_ALLOWANCE_S if servers else 0)
               + (0 if args.skip_triton else args.triton_budget_s)
               + (0 if args.skip_gateway else args.gateway_budget_s * len(args.gateway_shared_memory)))
    phases = 2 + (2 if servers else 0) + (0 if args.skip_triton or not args.component_concurrency else 1)
    progress = Progress(planned, phases=phases, out=out)
    uptime_start, cpu_start = uptime_line(), cpu_times()
    progress.log(f"results: {output_dir}")
    progress.log(f"uptime: {uptime_start}")

    variants = REFERENCE_VARIANTS[: 1 if args.reference_defaults_only else None]
    each_s = args.reference_duration / len(variants)
    # When there are server levels, every variant (the faster is the ceiling the targets use) is measured in
    # slices, one beside each server level: the ceiling and the servers then see the same minutes of the machine.
    interleaved = servers and bool(args.concurrency) and (
        not args.skip_gateway or (not args.skip_triton and ENSEMBLE in models))
    progress.begin("in-process reference", f"{len(variants)} ONNX Runtime configurations x {each_s:g} s, "
                                           "one frame per call" + ("; in slices between the server levels"
                                                                   if interleaved else ""))
    meters = {name: bench_reference.ReferenceMeter(spinning=spinning, repository=args.model_repository)
              for name, spinning in variants}
    if not interleaved:
        for meter in meters.values():
            meter.measure(each_s)
            meter.close()
            progress.log(bench_reference.summary(meter.document()).splitlines()[0])

    triton_sweep, gateway_sweeps = None, []
    if not args.skip_triton:
        triton_sweep = bench_triton.TritonSweep(
            models=models, concurrency=args.concurrency, repository=args.model_repository, output_dir=output_dir,
            settings=replace(bench_triton.Settings(), measurement_interval_ms=args.measurement_interval_ms),
            budget_s=args.triton_budget_s, log=progress.log,
            model_concurrency={model: args.component_concurrency for model in models if model != ENSEMBLE})
    if not args.skip_gateway:
        gateway_sweeps = [bench_gateway.GatewaySweep(
            concurrency=args.concurrency, repository=args.model_repository, output_dir=output_dir,
            settings=replace(bench_gateway.Settings(), duration_s=args.gateway_duration, shared_memory=transport,
                             warmup_s=args.gateway_warmup, workers=args.workers, threads=args.threads,
                             paired_passes=args.paired_passes),
            budget_s=args.gateway_budget_s, log=progress.log,
            document_name="gateway.json" if index == 0 else f"gateway-{transport}.json")
            for index, transport in enumerate(args.gateway_shared_memory)]
    triton, gateways = None, []
    with ExitStack() as stack:
        if servers:
            progress.begin("servers", "tritonserver, perf_analyzer inputs, gateway, checks and warm-up")
        started_here = servers and server is None
        if started_here:
            workdir = output_dir / "triton"
            workdir.mkdir(exist_ok=True)
            server = stack.enter_context(TritonServer(args.model_repository, log_file=workdir / "tritonserver.log"))
            progress.log(f"tritonserver ready in {server.startup_s:.1f} s at {server.grpc_url}")
        try:
            if triton_sweep:
                triton_sweep.prepare(server, started_here=started_here)
                progress.log(f"perf_analyzer {triton_sweep.document['perf_analyzer']['version']}, inputs for "
                             f"{', '.join(models)}")
            for sweep in gateway_sweeps:
                sweep.start(server)
            # mask_detection and the gateways level by level, alternating which goes first, so a change in the
            # machine's other load hits every sweep alike instead of one whole sweep.
            ensemble = triton_sweep is not None and ENSEMBLE in models
            if ensemble or gateway_sweeps:
                progress.begin("Triton direct (perf_analyzer, gRPC) and gateway (wrk, HTTP), level by level",
                               f"c={','.join(map(str, args.concurrency))}")
            for index, level in enumerate(args.concurrency):
                steps = ([lambda level=level: [_reference_slice(meter, each_s / len(args.concurrency), level,
                                                                progress) for meter in meters.values()]]
                         if interleaved else []) + (
                    [lambda level=level: triton_sweep.level(ENSEMBLE, level)] if ensemble else []) + [
                    lambda level=level, sweep=sweep: sweep.level(level) for sweep in gateway_sweeps]
                for step in steps[::-1] if index % 2 else steps:
                    _cap_budgets([sweep for sweep in (triton_sweep, *gateway_sweeps) if sweep], progress)
                    step()
            if interleaved:
                for meter in meters.values():
                    meter.close()
                    progress.log(bench_reference.summary(meter.document()).splitlines()[0])
            while gateway_sweeps:  # stops each gunicorn
                gateways.append(gateway_sweeps.pop(0).finish())
            if triton_sweep and triton_sweep.pending():
                progress.begin("composing models (perf_analyzer)",
                               f"c={','.join(map(str, args.component_concurrency))}; Triton budget left "
                               f"{triton_sweep.remaining_s:.0f} s")
                for model, level in triton_sweep.pending():
                    _cap_budgets([triton_sweep], progress)
                    triton_sweep.level(model, level)
        finally:
            while gateway_sweeps:
                gateways.append(gateway_sweeps.pop(0).finish())
            if triton_sweep:
                triton = triton_sweep.finish()

    references = []
    for name, meter in meters.items():
        references.append(meter.document())
        write_json(output_dir / f"{name}.json", references[-1])
    progress.begin("report")
    summary = report.summarize(
        references, triton, gateways, uptime_start=uptime_start, uptime_end=uptime_line(),
        elapsed_s=round(progress.elapsed_s, 1), cpu_steal=steal_during(cpu_start, cpu_times()),
        settings={"reference_duration_s": args.reference_duration,
                  "reference_variants": [name for name, _ in variants], "concurrency": args.concurrency,
                  "component_concurrency": args.component_concurrency, "models": models,
                  "triton_budget_s": None if args.skip_triton else args.triton_budget_s,
                  "gateway_budget_s": None if args.skip_gateway else args.gateway_budget_s,
                  "gateway_shared_memory": [] if args.skip_gateway else args.gateway_shared_memory,
                  "gateway_duration_s": args.gateway_duration, "model_repository": str(args.model_repository)})
    paths = report.write_report(summary, output_dir)
    progress.log(f"wrote {', '.join(path.name for path in paths.values())}")
    out("")
    out(report.console_table(summary))
    out(f"results: {output_dir}  ({progress.clock(progress.elapsed_s)} in all)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, out=lambda line: print(line, flush=True))
    except (PerfAnalyzerError, TritonStartError, bench_gateway.GatewayBenchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
