"""Real photographs shipped with matplotlib and scikit-image, and deterministic variants of them.

Tests and benchmarks use these instead of synthetic arrays, so parity and speed are measured on
the activations real faces cause. matplotlib and scikit-image come with the `test` extra.
"""
from __future__ import annotations

import os
from typing import Callable

import cv2
import matplotlib
import numpy as np
import skimage.data


def real_images() -> dict[str, np.ndarray]:
    """grace_hopper (matplotlib) and astronaut (scikit-image) as BGR uint8, one face each."""
    hopper_path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    hopper = cv2.imread(hopper_path)
    if hopper is None:
        raise FileNotFoundError(f"{hopper_path}: not readable by OpenCV")
    astronaut = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    return {"grace_hopper": hopper, "astronaut": astronaut}


def _crop(image: np.ndarray, top: float, left: float, bottom: float, right: float) -> np.ndarray:
    """The part of `image` between fractional edges, copied so it is contiguous."""
    height, width = image.shape[:2]
    return image[int(top * height):int(bottom * height), int(left * width):int(right * width)].copy()


def _noisy(image: np.ndarray) -> np.ndarray:
    """Sensor-like Gaussian noise, seeded so every run sees the same pixels."""
    noise = np.random.default_rng(0).normal(0.0, 12.0, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """The image after a lossy JPEG round trip, as a camera stream would deliver it."""
    _, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(encoded, cv2.IMREAD_COLOR)


VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "half": lambda im: cv2.resize(im, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
    "one_and_half": lambda im: cv2.resize(im, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR),
    "tiny": lambda im: cv2.resize(im, (96, 120), interpolation=cv2.INTER_AREA),
    "stretched_wide": lambda im: cv2.resize(im, (im.shape[1] * 2, im.shape[0])),
    "hflip": lambda im: cv2.flip(im, 1),
    "vflip": lambda im: cv2.flip(im, 0),
    "rot90": lambda im: cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE),
    "center_crop": lambda im: _crop(im, 0.2, 0.2, 0.8, 0.8),
    "top_left_crop": lambda im: _crop(im, 0.0, 0.0, 0.6, 0.6),
    "bottom_strip": lambda im: _crop(im, 0.5, 0.0, 1.0, 1.0),
    "brighter": lambda im: cv2.convertScaleAbs(im, alpha=1.0, beta=60),
    "darker": lambda im: cv2.convertScaleAbs(im, alpha=0.45, beta=0),
    "high_contrast": lambda im: cv2.convertScaleAbs(im, alpha=1.6, beta=-70),
    "gray": lambda im: cv2.cvtColor(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR),
    "blurred": lambda im: cv2.GaussianBlur(im, (9, 9), 0),
    "noisy": _noisy,
    "jpeg_q15": lambda im: _jpeg(im, 15),
}


def image_variants(images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every variant of every image, named "<image>/<variant>", all BGR uint8."""
    return {f"{name}/{variant}": make(image)
            for name, image in images.items() for variant, make in VARIANTS.items()}
