"""`python -m benchmarks` (what `make bench` runs): reference pipeline and Triton, side by side, one results folder.

    python -m benchmarks                      # reference 20 s + full Triton sweep (about 3 minutes)
    python -m benchmarks --reference-duration 5 --concurrency 1:2 --models mask_detection

Results: benchmarks/results/<timestamp>/{reference.json, triton.json, summary.json, triton/*}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from benchmarks import bench_reference, bench_triton
from benchmarks.common import machine_line, results_dir, write_json
from benchmarks.model_inputs import ENSEMBLE, MODELS
from ensemble.perf_analyzer import PerfAnalyzerError
from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.launcher import TritonStartError


def comparison(reference: dict, triton: dict | None) -> dict:
    """Headline figures: in-process images/s against the ensemble's best stable throughput."""
    summary = {"reference_images_per_s": reference["results"]["throughput_images_per_s"],
               "reference_p50_ms": reference["results"]["latency_per_request"]["p50_ms"],
               "machine": machine_line(reference["machine"])}
    levels = [level for level in ((triton or {}).get("models", {}).get(ENSEMBLE, {}).get("levels", []))
              if level.get("ok")]
    if levels:
        best = max(levels, key=lambda level: level["throughput_infer_per_s"])
        single = next((level for level in levels if level["concurrency"] == 1), None)
        summary.update(
            triton_best_images_per_s=best["throughput_infer_per_s"], triton_best_concurrency=best["concurrency"],
            triton_best_stable=best.get("stable", True),
            triton_c1_p50_ms=single and round(single["p50_latency_us"] / 1e3, 2),
            triton_vs_reference=round(best["throughput_infer_per_s"] / summary["reference_images_per_s"], 3))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-duration", type=float, default=20.0)
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--concurrency", type=bench_triton.parse_concurrency, default=[1, 2, 3, 4])
    parser.add_argument("--budget-s", type=float, default=170.0, help="wall-clock budget of the Triton sweep")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<timestamp>/")
    args = parser.parse_args(argv)

    output_dir = args.results_dir or results_dir()
    reference = bench_reference.run(args.reference_duration, repository=args.model_repository)
    write_json(output_dir / "reference.json", reference)
    print(bench_reference.summary(reference), flush=True)
    triton = None
    if not args.skip_triton:
        try:
            triton = bench_triton.run(models=[m.strip() for m in args.models.split(",") if m.strip()],
                                      concurrency=args.concurrency, repository=args.model_repository,
                                      output_dir=output_dir, budget_s=args.budget_s,
                                      log=lambda message: print(message, flush=True))
        except (PerfAnalyzerError, TritonStartError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    summary = comparison(reference, triton)
    write_json(output_dir / "summary.json", summary)
    print("\n".join(f"  {key}: {value}" for key, value in summary.items()))
    print(f"results: {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
