"""Real request inputs for the ensemble and for each of its composing models, all derived from the image set.

The composing models get what they would receive inside the ensemble: the detector the
preprocessed blobs of the benchmark frames, postprocess the detector's real LOC/CONF heads
with their frames, the classifier the real face crops the reference pipeline finds.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ensemble.layouts import CLASSIFIER_INPUT, DETECTOR_INPUT
from ensemble.postprocess import detect_faces
from ensemble.preprocess import classifier_batch, detector_blobs
from ensemble.reference import ReferencePipeline

ENSEMBLE = "mask_detection"
MODELS = ("mask_detection", "preprocess", "face_detector", "postprocess", "mask_classifier")

Request = dict[str, np.ndarray]


def model_requests(images: Mapping[str, np.ndarray], pipeline: ReferencePipeline,
                   models: tuple[str, ...] = MODELS) -> dict[str, list[Request]]:
    """Model name -> one request per sample (input name -> array without the batch dimension)."""
    frames = [np.ascontiguousarray(image) for image in images.values()]
    requests: dict[str, list[Request]] = {}
    if ENSEMBLE in models:
        requests[ENSEMBLE] = [{"IMAGE": frame} for frame in frames]
    if "preprocess" in models:
        requests["preprocess"] = [{"IMAGE": frame} for frame in frames]
    if "face_detector" in models:
        requests["face_detector"] = [{DETECTOR_INPUT.tensor: blob} for blob in detector_blobs(frames)]
    if "postprocess" in models or "mask_classifier" in models:
        locs, confs = pipeline.raw_heads(frames)
        if "postprocess" in models:
            requests["postprocess"] = [{"LOC": loc, "CONF": conf, "IMAGE": frame}
                                       for loc, conf, frame in zip(locs, confs, frames)]
        if "mask_classifier" in models:
            crops = []
            for frame, loc, conf in zip(frames, locs, confs):
                boxes, _ = detect_faces(loc, conf, pipeline.priors, frame.shape[:2], pipeline.params)
                if len(boxes):
                    crops.extend(classifier_batch(frame, boxes))
            if not crops:
                raise RuntimeError("the reference pipeline found no face in the image set; no classifier inputs")
            requests["mask_classifier"] = [{CLASSIFIER_INPUT.tensor: crop} for crop in crops]
    unknown = set(models) - set(requests)
    if unknown:
        raise KeyError(f"no inputs defined for {sorted(unknown)}; known: {MODELS}")
    return requests
