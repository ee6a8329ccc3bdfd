"""Raw SSD heads → face boxes in pixels, and classifier probabilities → labels.

Thresholds have no defaults here: they come from model_repository/postprocess/config.pbtxt
(its `parameters`), optionally overridden per request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
from array_api_compat import array_namespace

from ensemble.errors import InvalidRequest
from ensemble.ssd import Array, Priors, decode_boxes, nms


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a number, got {value!r}") from None


def _fraction(name: str, value: Any) -> float:
    number = _number(name, value)
    if not (0.0 < number <= 1.0):
        raise InvalidRequest(f"{name} must be a number in (0, 1], got {value!r}")
    return number


def _positive_int(name: str, value: Any) -> int:
    number = _number(name, value)
    if not (math.isfinite(number) and number.is_integer() and number >= 1):
        raise InvalidRequest(f"{name} must be an integer >= 1, got {value!r}")
    return int(number)


def _non_negative(name: str, value: Any) -> float:
    number = _number(name, value)
    if not (math.isfinite(number) and number >= 0):
        raise InvalidRequest(f"{name} must be a number >= 0, got {value!r}")
    return number


@dataclass(frozen=True)
class DetectionParams:
    """The thresholds of one detection request."""

    confidence: float     # minimum face score kept
    iou: float            # NMS overlap above which the weaker box goes
    max_faces: int        # most faces returned per image, best first
    min_face_size: float  # shorter box side, in pixels of the image sent, below which a box is dropped
    pre_nms_top_k: int    # candidates entering NMS (Caffe's top_k)

    _PARSERS = {
        "confidence": _fraction, "iou": _fraction, "max_faces": _positive_int,
        "min_face_size": _non_negative, "pre_nms_top_k": _positive_int,
    }

    @classmethod
    def from_config(cls, parameters: Mapping[str, str]) -> DetectionParams:
        """Read every threshold from a model config's `parameters`; a missing one is an error."""
        missing = [f.name for f in fields(cls) if f.name not in parameters]
        if missing:
            raise ValueError(f"config parameters lack {', '.join(missing)}")
        return cls(**{f.name: cls._PARSERS[f.name](f.name, parameters[f.name]) for f in fields(cls)})

    def override(self, values: Mapping[str, Any], limits: Mapping[str, int] | None = None) -> DetectionParams:
        """These params with a request's overrides applied; keys that are not thresholds are ignored.

        `limits` (override_limits): the largest value a request may ask for, by name.
        """
        parsed = {name: self._PARSERS[name](name, value) for name, value in values.items() if name in self._PARSERS}
        for name, limit in (limits or {}).items():
            if parsed.get(name, 0) > limit:
                raise InvalidRequest(f"{name} must be at most {limit} (this model's {name}{LIMIT_SUFFIX}), "
                                     f"got {values[name]!r}")
        return replace(self, **parsed)


# Request overrides with an upper bound, read from the config parameter <name>_limit: NMS holds a K x K overlap
# matrix for K = pre_nms_top_k candidates, and every face kept is cropped and classified, so one request asking
# for more would take the memory and time of every other request on the instance.
LIMITED_OVERRIDES = ("max_faces", "pre_nms_top_k")
LIMIT_SUFFIX = "_limit"


def override_limits(parameters: Mapping[str, str], defaults: DetectionParams) -> dict[str, int]:
    """The config's <name>_limit for each of LIMITED_OVERRIDES; each must allow at least the config's own value."""
    limits = {}
    for name in LIMITED_OVERRIDES:
        key = name + LIMIT_SUFFIX
        if key not in parameters:
            raise ValueError(f"config parameters lack {key}")
        limits[name] = _positive_int(key, parameters[key])
        if getattr(defaults, name) > limits[name]:
            raise ValueError(f"config parameter {name} ({getattr(defaults, name)}) exceeds {key} ({limits[name]})")
    return limits


def detect_faces(loc: Array, conf: Array, priors: Priors, image_hw: tuple[int, int],
                 params: DetectionParams) -> tuple[Array, Array]:
    """One image's raw heads ([P,4], [P,2]) → (boxes [K,4] x1 y1 x2 y2 in pixels, scores [K]), best first."""
    xp = array_namespace(loc)
    height, width = image_hw
    scores = conf[:, 1]
    candidates = xp.nonzero(scores > params.confidence)[0]
    boxes = decode_boxes(loc[candidates], priors.take(candidates))
    limits = xp.asarray([width, height, width, height], dtype=boxes.dtype)
    boxes, scores = boxes * limits, scores[candidates]
    # Sizes are judged on what lies inside the image; NMS sees unclipped boxes, as Caffe's does. Unlike Caffe
    # (no size filter), boxes under min_face_size or wholly outside are dropped before top-k and NMS: they take
    # no top-k place and suppress no neighbour. The parity test (min_face_size 0) finds the same faces as Caffe's
    # cv2.dnn on its images; a box wholly outside the image could still make a difference there.
    inside = xp.clip(boxes, 0, limits)
    visible = xp.min(inside[:, 2:] - inside[:, :2], axis=1)
    kept = (visible > 0) & (visible >= params.min_face_size)
    boxes, inside, scores = boxes[kept], inside[kept], scores[kept]
    keep = nms(boxes, scores, params.iou, params.pre_nms_top_k)[:params.max_faces]
    return inside[keep], scores[keep]


def config_labels(value: str) -> tuple[str, ...]:
    """The `labels` parameter ("mask,no_mask") as names, spaces after the commas not part of them."""
    return tuple(label.strip() for label in value.split(","))


def label_faces(probabilities: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Classifier softmax [K, C] → (label per face as an object array, its probability as float32)."""
    best = np.argmax(probabilities, axis=1)
    names = np.asarray(labels, dtype=object)[best]
    return names, probabilities[np.arange(len(best)), best].astype(np.float32)


def padded_outputs(boxes: Sequence[np.ndarray], scores: Sequence[np.ndarray], labels: np.ndarray,
                   label_scores: np.ndarray, counts: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-image results as [B, N, ...] arrays padded to the largest face count N (zero faces: N = 0).

    `boxes`/`scores` hold one array per image; `labels`/`label_scores` the faces of all images in order,
    `counts[i]` of them for image i. Padding rows are zeros and empty labels; NUM_DETECTIONS says which are real.
    """
    batch, width = len(counts), max(counts, default=0)
    outputs = {
        "BOXES": np.zeros((batch, width, 4), np.float32),
        "SCORES": np.zeros((batch, width), np.float32),
        "LABELS": np.full((batch, width), b"", dtype=object),
        "LABEL_SCORES": np.zeros((batch, width), np.float32),
        "NUM_DETECTIONS": np.asarray(counts, np.int32).reshape(batch, 1),
    }
    bounds = np.cumsum([0, *counts])
    for row, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        outputs["BOXES"][row, :stop - start] = boxes[row]
        outputs["SCORES"][row, :stop - start] = scores[row]
        outputs["LABELS"][row, :stop - start] = labels[start:stop]
        outputs["LABEL_SCORES"][row, :stop - start] = label_scores[start:stop]
    return outputs
