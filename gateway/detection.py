"""One uploaded image through the service: decode, fit, infer on Triton, map boxes back to the displayed image."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.imaging import boxes_to_original, decode_for_inference, fit_within
from gateway.params import DetectParams
from gateway.settings import Settings
from gateway.tracing import stage_span
from gateway.triton_client import ModelDetections


class Detector(Protocol):
    """What the pipeline needs from Triton (a fake in unit tests)."""

    def detect(self, image_bgr: np.ndarray, parameters: dict | None = None) -> ModelDetections: ...


@dataclass(frozen=True)
class ImageResult:
    """One image's faces in its displayed pixel coordinates, plus what it cost."""

    pixels: np.ndarray | None  # the decoded BGR image at full size when asked to keep it (annotation)
    width: int  # of the image as displayed
    height: int
    boxes: np.ndarray  # [N, 4] float64 x1 y1 x2 y2
    scores: np.ndarray
    labels: list[str]
    label_scores: np.ndarray
    model_version: str
    transport: str  # how the pixels reached Triton
    inline_reason: str | None  # why they went inline although shared memory was on
    decode_ms: float
    inference_ms: float

    def detections_json(self) -> list[dict]:
        """The `detections` array of the API, boxes rounded to 0.01 px."""
        return [
            {"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "label": label,
             "label_score": round(float(label_score), 4)}
            for box, score, label, label_score in zip(self.boxes, self.scores, self.labels, self.label_scores)
        ]


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def detect_in_image(data: bytes, params: DetectParams, settings: Settings, detector: Detector, *,
                    keep_pixels: bool = False, stages: dict[str, float] | None = None) -> ImageResult:
    """Run the whole pipeline on one encoded image; raises typed gateway errors for bad input or Triton trouble.

    `keep_pixels`: decode at full size and keep the pixels (to draw on them); otherwise a large JPEG is
    decoded straight to a reduced scale, since only its downscaled copy goes to Triton.
    `stages`: filled with the milliseconds of each stage that ran ("decode", "triton"), a failed Triton call's
    included, so the caller can measure a request that ends in an error too.
    """
    stages = {} if stages is None else stages
    start = time.perf_counter()
    with stage_span("decode", **{"image.bytes": len(data)}) as span:  # sizes only, never the bytes
        decoded = decode_for_inference(data, settings.max_pixels, 0 if keep_pixels else settings.max_side)
        scaled = fit_within(decoded.pixels, settings.max_side, (decoded.width, decoded.height))
        span.set_attributes({"image.width": decoded.width, "image.height": decoded.height,
                             "image.sent_width": int(scaled.pixels.shape[1]),
                             "image.sent_height": int(scaled.pixels.shape[0]), "image.decoder": decoded.decoder})
    decode_ms = stages["decode"] = _elapsed_ms(start)

    start = time.perf_counter()
    try:
        found = detector.detect(scaled.pixels, params.triton_parameters())  # the Triton CLIENT span is made inside
    finally:
        inference_ms = stages["triton"] = _elapsed_ms(start)

    return ImageResult(
        pixels=decoded.pixels if keep_pixels else None, width=decoded.width, height=decoded.height,
        boxes=boxes_to_original(found.boxes, scaled, decoded.width, decoded.height), scores=found.scores,
        labels=found.labels, label_scores=found.label_scores, model_version=found.model_version,
        transport=found.transport, inline_reason=found.inline_reason, decode_ms=decode_ms, inference_ms=inference_ms,
    )
