"""`python -m ensemble.build`: fetch the pinned weights, export both ONNX models, verify them.

Idempotent: each exported model carries a stamp of what it was built from (weights, exporter
source and the config.pbtxt it was verified against), written only once it passed that check; a
model whose stamp matches is left alone. Files another model reads (the
detector's priors, for postprocess) are copied into that model's folder whenever they differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from ensemble.export import onnx_io
from ensemble.export.face_detector import export_face_detector
from ensemble.export.mask_classifier import export_mask_classifier
from ensemble.reference import DEFAULT_REPOSITORY, DETECTOR_PRIORS, MODEL_FILE
from ensemble.triton.config import load_config
from ensemble.weights import WeightFiles, fetch_weights, sha256_of

STAMP_FILE = ".build.json"
CONFIG_FILE = "config.pbtxt"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelBuild:
    """One exported model: its repository name, its weight files and the code that exports it."""

    name: str
    weights: Callable[[WeightFiles], tuple[Path, ...]]
    export: Callable[..., dict]
    sources: tuple[Path, ...]


BUILDS = (
    ModelBuild("face_detector", lambda w: (w.prototxt, w.caffemodel), export_face_detector,
               (PACKAGE_DIR / "export" / "face_detector.py", PACKAGE_DIR / "export" / "prototxt.py")),
    ModelBuild("mask_classifier", lambda w: (w.keras_h5,), export_mask_classifier,
               (PACKAGE_DIR / "export" / "mask_classifier.py",)),
)
SHARED_SOURCES = (PACKAGE_DIR / "export" / "onnx_io.py", PACKAGE_DIR / "layouts.py")
# Files another model reads, copied into its own folder: Triton copies each model of a repository in cloud
# storage (S3, GCS) to a folder of its own, where `../face_detector` is not there to read.
COPIES = ((DETECTOR_PRIORS, "postprocess/1/priors.npy"),)


def fingerprint(build: ModelBuild, weights: WeightFiles, repository: Path) -> str:
    """Digest of everything the model is a function of, and of the config.pbtxt `verify` checked it against."""
    digest = hashlib.sha256()
    for path in build.weights(weights):
        digest.update(sha256_of(path).encode())
    for path in (*build.sources, *SHARED_SOURCES):
        digest.update(path.read_bytes())
    config = repository / build.name / CONFIG_FILE
    digest.update(config.read_bytes() if config.is_file() else b"no config.pbtxt")
    return digest.hexdigest()


def is_current(model_dir: Path, expected: str) -> bool:
    """Exported from the same inputs, and every file that export wrote (model.onnx, priors.npy) still there."""
    stamp = model_dir / STAMP_FILE
    if not stamp.exists():
        return False
    recorded = json.loads(stamp.read_text())
    written = recorded.get("files", [MODEL_FILE])
    return recorded.get("fingerprint") == expected and all((model_dir / name).is_file() for name in written)


def verify(repository: Path, name: str) -> str:
    """Load the model in ONNX Runtime, run a batch of 2, and check its I/O against config.pbtxt."""
    config = load_config(repository / name)
    try:
        session = ort.InferenceSession(str(repository / name / MODEL_FILE), providers=["CPUExecutionProvider"])
        inputs = {i.name: np.zeros((2, *i.dims), dtype=np.float32) for i in config.input}
        outputs = session.run([o.name for o in config.output], inputs)
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidArgument...) share no base with ours
        raise onnx_io.ExportError(f"{name}: ONNX Runtime could not load or run it as config.pbtxt says: {exc}") \
            from exc
    for spec, array in zip(config.output, outputs):
        if tuple(array.shape) != (2, *spec.dims):
            raise onnx_io.ExportError(f"{name}: output {spec.name} has shape {array.shape}, "
                                      f"config.pbtxt says [batch, {', '.join(map(str, spec.dims))}]")
    shapes = ", ".join(f"{o.name}{list(a.shape[1:])}" for o, a in zip(config.output, outputs))
    return f"{name}: onnxruntime ok, outputs {shapes}"


def build(repository: Path = DEFAULT_REPOSITORY, force: bool = False, log=print) -> list[str]:
    """Export every model that is missing or stale; return the names exported."""
    weights = fetch_weights()
    log(f"weights: {', '.join(p.name for p in weights.all())} (sha256 verified) in {weights.prototxt.parent}")
    exported = []
    for model in BUILDS:
        model_dir = repository / model.name / "1"
        expected = fingerprint(model, weights, repository)
        if not force and is_current(model_dir, expected):
            log(f"{model.name}: up to date")
        else:
            started = time.perf_counter()
            report = model.export(*model.weights(weights), model_dir)
            log(f"{model.name}: exported to {model_dir / 'model.onnx'} in {time.perf_counter() - started:.1f}s "
                f"{report}")
            log(verify(repository, model.name))  # before the stamp: a model that fails it is exported again next time
            written = sorted(path.name for path in model_dir.iterdir() if path.is_file() and path.name != STAMP_FILE)
            onnx_io.write_atomically(model_dir / STAMP_FILE, json.dumps(
                {"fingerprint": expected, "files": written, **report}, default=str).encode())
            exported.append(model.name)
        copy_shared_files(repository, log, model.name)  # at once: a later model's failed export leaves no stale copy
    return exported


def copy_shared_files(repository: Path, log=print, model: str | None = None) -> None:
    """Bring every COPIES destination (of `model`'s files, or of all) up to date with its source; a no-op when
    they already match."""
    for source, destination in COPIES:
        if model is not None and not source.startswith(f"{model}/"):
            continue
        if not (repository / source).is_file():
            raise onnx_io.ExportError(f"{source} is missing: run `python -m ensemble.build --force`")
        payload = (repository / source).read_bytes()
        target = repository / destination
        if target.is_file() and target.read_bytes() == payload:
            continue
        onnx_io.write_atomically(target, payload)
        log(f"{destination}: copied from {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--force", action="store_true", help="export even when the models are up to date")
    args = parser.parse_args(argv)
    try:
        build(args.repository, args.force)
    except (onnx_io.ExportError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
