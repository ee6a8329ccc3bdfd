"""The one image set every benchmark sends: real photographs at realistic sizes, always the same pixels.

The two real photographs (matplotlib's grace_hopper, scikit-image's astronaut) plus a fixed
subset of the deterministic variants from ensemble/sample_images.py: larger frames (x1.5 and a 2:1 wide
frame, closer to camera resolutions), and the degradations a camera stream delivers (JPEG at
quality 15, sensor noise). Ten BGR uint8 frames of 0.26-0.69 megapixels (512x512 to 900x768), each with one face.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from ensemble import sample_images

ORIGINALS = ("grace_hopper", "astronaut")
VARIANTS = ("one_and_half", "stretched_wide", "jpeg_q15", "noisy")


@lru_cache(maxsize=1)
def _cached() -> tuple[tuple[str, np.ndarray], ...]:
    originals = sample_images.real_images()
    missing = [name for name in ORIGINALS if name not in originals]
    missing += [variant for variant in VARIANTS if variant not in sample_images.VARIANTS]
    if missing:
        raise KeyError(f"ensemble/sample_images.py no longer provides {missing}; update benchmarks/image_set.py")
    selected = [(name, originals[name]) for name in ORIGINALS]
    selected += [(f"{name}/{variant}", sample_images.VARIANTS[variant](originals[name])) for name in ORIGINALS
                 for variant in VARIANTS]
    for _, image in selected:
        image.setflags(write=False)
    return tuple(selected)


def benchmark_images() -> dict[str, np.ndarray]:
    """The benchmark frames, name -> BGR uint8 [H, W, 3], in a fixed order (read-only arrays)."""
    return {name: np.ascontiguousarray(image) for name, image in _cached()}


def describe(images: dict[str, np.ndarray]) -> dict:
    """What a result file records about the image set: names, shapes and a digest of the pixels."""
    digest = hashlib.sha256()
    for name, image in images.items():
        digest.update(name.encode())
        digest.update(repr(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    pixels = [image.shape[0] * image.shape[1] for image in images.values()]
    return {
        "count": len(images),
        "images": [{"name": name, "height": image.shape[0], "width": image.shape[1]}
                   for name, image in images.items()],
        "mean_megapixels": round(sum(pixels) / len(pixels) / 1e6, 3),
        "sha256": digest.hexdigest(),
    }
