"""SSD prior boxes, box decoding and NMS, written once for NumPy and CuPy arrays alike."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from array_api_compat import array_namespace

Array = Any  # numpy.ndarray or cupy.ndarray


@dataclass(frozen=True)
class Priors:
    """Prior boxes in centre form (cx, cy, w, h; normalised) and their per-coordinate variances."""

    center: Array
    variances: Array

    def take(self, index: Array) -> Priors:
        return Priors(self.center[index], self.variances[index])

    def on(self, xp) -> Priors:
        """The same priors as arrays of namespace `xp` (e.g. moved to the GPU once, when heads first arrive there)."""
        return Priors(xp.asarray(self.center), xp.asarray(self.variances))


def load_priors(path: Path) -> Priors:
    """Read priors.npy ([2, P, 4]: Caffe PriorBox corners, then variances) written by the exporter."""
    corners, variances = np.load(path).astype(np.float32)
    center = np.concatenate([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], axis=1)
    return Priors(center, variances)


def decode_boxes(loc: Array, priors: Priors) -> Array:
    """Caffe's CENTER_SIZE decoding (variance not encoded in target) → normalised x1 y1 x2 y2."""
    xp = array_namespace(loc)
    prior_xy, prior_wh = priors.center[..., :2], priors.center[..., 2:]
    center = prior_xy + loc[..., :2] * priors.variances[..., :2] * prior_wh
    size = prior_wh * xp.exp(loc[..., 2:] * priors.variances[..., 2:])
    return xp.concat([center - size / 2, center + size / 2], axis=-1)


def pairwise_iou(a: Array, b: Array) -> Array:
    """IoU of every box in `a` [K,4] with every box in `b` [M,4] (x1 y1 x2 y2) → [K, M]."""
    xp = array_namespace(a)
    top_left = xp.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = xp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = xp.prod(xp.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a = xp.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = xp.prod(b[:, 2:] - b[:, :2], axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


def nms(boxes: Array, scores: Array, iou_threshold: float, top_k: int | None = None) -> Array:
    """Greedy NMS as Caffe's ApplyNMSFast: indices of kept boxes, best first.

    The IoU matrix is computed where the arrays live (GPU or CPU); only the K×K boolean
    overlap mask crosses to the host for the inherently sequential sweep (K ≤ top_k).
    """
    xp = array_namespace(boxes)
    order = xp.argsort(-scores, stable=True)
    if top_k is not None:
        order = order[:top_k]
    ranked = boxes[order]
    overlaps = np.asarray(to_host(pairwise_iou(ranked, ranked) > iou_threshold))
    keep = np.ones(overlaps.shape[0], dtype=bool)
    for i in range(overlaps.shape[0]):
        if keep[i]:
            keep[i + 1:] &= ~overlaps[i, i + 1:]
    return order[xp.asarray(np.flatnonzero(keep))]


def to_host(array: Array) -> np.ndarray:
    """A NumPy view/copy of `array`, wherever it lives."""
    if isinstance(array, np.ndarray):
        return array
    get = getattr(array, "get", None)  # CuPy
    if get is not None:
        return get()
    return np.asarray(array.cpu())  # torch
