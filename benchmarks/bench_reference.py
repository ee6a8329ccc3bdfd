"""In-process reference pipeline throughput: `ReferencePipeline.detect` on the benchmark image set, one process.

This is the ceiling a serving stack is compared with: same models, same pre/postprocessing,
no serialization, no network, no queues.

    python -m benchmarks.bench_reference --duration 20
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Sequence

import onnxruntime as ort

from benchmarks.common import latency_summary, machine_info, machine_line, results_dir, write_json
from benchmarks.image_set import benchmark_images, describe
from ensemble.reference import DEFAULT_REPOSITORY, MODEL_FILE, ReferencePipeline

SCHEMA = "facemask.bench.reference/1"


def ort_session(path: Path, threads: int | None, spinning: bool | None) -> ort.InferenceSession:
    """A CPU session like ReferencePipeline's, with ONNX Runtime's intra-op spin-waiting switched on or off.

    ORT's intra-op worker threads spin after each operator by default; on a machine whose cores are
    shared (2 cores, several processes) that spinning takes CPU from everyone else, this process included.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pipeline_for(repository: Path, threads: int | None = None, spinning: bool | None = None) -> ReferencePipeline:
    """ReferencePipeline, its two ONNX Runtime sessions rebuilt when `spinning` is set."""
    pipeline = ReferencePipeline(repository, threads=threads)
    if spinning is not None:
        pipeline.detector = ort_session(Path(repository) / "face_detector" / MODEL_FILE, threads, spinning)
        pipeline.classifier = ort_session(Path(repository) / "mask_classifier" / MODEL_FILE, threads, spinning)
    return pipeline


class ReferenceMeter:
    """The reference pipeline measured over one or more slices of time, summed into one result.

    `make bench` puts one slice before each server level, so the ceiling and the servers are measured
    through the same minutes of a machine whose speed drifts. `threads`: ONNX Runtime intra-op threads
    (None: ORT's default, one per core); `spinning`: False switches ORT's spin-waiting off (None: ORT's
    default, on).
    """

    def __init__(self, *, warmup_passes: int = 1, batch_size: int = 1, threads: int | None = None,
                 spinning: bool | None = None, repository: Path = DEFAULT_REPOSITORY):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.machine = machine_info()  # before the run: the load average is about the machine, not about us
        self.images = benchmark_images()
        self.settings = {"duration_s": 0.0, "warmup_passes": warmup_passes, "batch_size": batch_size,
                         "ort_intra_op_threads": threads, "ort_allow_spinning": spinning,
                         "model_repository": str(repository)}
        self._pipeline = pipeline_for(repository, threads, spinning)
        self._cycle = itertools.cycle(self.images.values())
        for _ in range(warmup_passes):
            for frame in self.images.values():
                self._pipeline.detect(frame)
        self._latencies: list[float] = []
        self._faces = self._processed = 0
        self._elapsed = self._cpu = 0.0
        self.slices: list[dict] = []

    def measure(self, duration_s: float, *, min_requests: int = 1, label: str = "") -> dict:
        """Run for about `duration_s` seconds (at least `min_requests` calls); returns this slice's figures."""
        batch_size = self.settings["batch_size"]
        latencies, faces, processed = [], 0, 0
        started, cpu_started = time.perf_counter(), time.process_time()
        while len(latencies) < min_requests or time.perf_counter() - started < duration_s:
            batch = [next(self._cycle) for _ in range(batch_size)]
            began = time.perf_counter()
            detections = (self._pipeline.detect_batch(batch) if batch_size > 1
                          else [self._pipeline.detect(batch[0])])
            latencies.append(time.perf_counter() - began)
            faces += sum(len(found) for found in detections)
            processed += len(batch)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        self._latencies += latencies
        self._faces, self._processed = self._faces + faces, self._processed + processed
        self._elapsed, self._cpu = self._elapsed + elapsed, self._cpu + cpu
        self.settings["duration_s"] = round(self.settings["duration_s"] + duration_s, 3)
        piece = {"label": label, "images": processed, "elapsed_s": round(elapsed, 3),
                 "throughput_images_per_s": round(processed / elapsed, 3)}
        self.slices.append(piece)
        return piece

    def close(self) -> None:
        """Free the ONNX Runtime sessions (their threads) once this variant is measured."""
        self._pipeline = None

    def document(self) -> dict:
        """The result document of every slice so far."""
        if not self._processed:
            raise RuntimeError("nothing measured yet")
        return {
            "schema": SCHEMA,
            "benchmark": "reference",
            "description": "ReferencePipeline (ONNX Runtime, CPU) in one process, frames sent one request at a time",
            "machine": self.machine,
            "image_set": describe(self.images),
            "settings": dict(self.settings),
            "results": {
                "images": self._processed,
                "requests": len(self._latencies),
                "elapsed_s": round(self._elapsed, 3),
                "throughput_images_per_s": round(self._processed / self._elapsed, 3),
                "latency_per_request": latency_summary(self._latencies),
                "cpu_seconds_per_image": round(self._cpu / self._processed, 5),
                "cpu_utilization_cores": round(self._cpu / self._elapsed, 3),
                "faces_per_image": round(self._faces / self._processed, 3),
            },
            "slices": list(self.slices),
        }


def run(duration_s: float = 20.0, *, warmup_passes: int = 1, batch_size: int = 1, threads: int | None = None,
        spinning: bool | None = None, repository: Path = DEFAULT_REPOSITORY, min_requests: int = 1) -> dict:
    """One slice of about `duration_s` seconds after warm-up; returns the result document."""
    meter = ReferenceMeter(warmup_passes=warmup_passes, batch_size=batch_size, threads=threads, spinning=spinning,
                           repository=repository)
    meter.measure(duration_s, min_requests=min_requests)
    meter.close()
    return meter.document()


def summary(document: dict) -> str:
    results, settings = document["results"], document["settings"]
    latency = results["latency_per_request"]
    spinning = settings.get("ort_allow_spinning")
    variant = "ORT defaults" if spinning is None and not settings.get("ort_intra_op_threads") else ", ".join(
        filter(None, [settings.get("ort_intra_op_threads") and f"{settings['ort_intra_op_threads']} ORT threads",
                      spinning is not None and f"spinning {'on' if spinning else 'off'}"]))
    return (f"reference pipeline [{variant}]: {results['throughput_images_per_s']:.1f} images/s "
            f"(batch {settings['batch_size']}, {results['images']} images in {results['elapsed_s']:.1f} s, "
            f"p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms, "
            f"{results['cpu_utilization_cores']:.2f} cores busy)\n"
            f"  machine: {machine_line(document['machine'])}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_reference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds (default 20)")
    parser.add_argument("--warmup-passes", type=int, default=1, help="unmeasured passes over the image set")
    parser.add_argument("--batch-size", type=int, default=1, help="frames per detect_batch call (default 1)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    parser.add_argument("--no-spinning", action="store_true",
                        help="switch ONNX Runtime's intra-op spin-waiting off (default: ORT's default, on)")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--results-dir", type=Path, help="default: benchmarks/results/<timestamp>/")
    parser.add_argument("--output", type=Path, help="default: <results-dir>/reference.json")
    args = parser.parse_args(argv)

    document = run(args.duration, warmup_passes=args.warmup_passes, batch_size=args.batch_size,
                   threads=args.threads, spinning=False if args.no_spinning else None,
                   repository=args.model_repository)
    output = args.output or (args.results_dir or results_dir()) / "reference.json"
    write_json(output, document)
    print(summary(document))
    print(f"  result: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
