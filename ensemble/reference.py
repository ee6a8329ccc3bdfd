"""The whole detection pipeline in process with ONNX Runtime: the ground truth and the benchmark ceiling.

It reads the same model files, priors, labels and thresholds as the Triton ensemble
(model_repository/), so any difference between the two is a serving bug.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ensemble.layouts import CLASSIFIER_INPUT, CLASSIFIER_OUTPUT, DETECTOR_INPUT, DETECTOR_OUTPUTS
from ensemble.postprocess import DetectionParams, config_labels, detect_faces, label_faces
from ensemble.preprocess import classifier_batch, detector_blobs
from ensemble.ssd import load_priors
from ensemble.triton.config import load_config, string_parameters

DEFAULT_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"
MODEL_FILE = Path("1") / "model.onnx"
# The detector export's prior boxes. postprocess decodes against a copy in its own folder (ensemble.build.COPIES);
# the reference reads the original, so a stale copy shows as a parity failure.
DETECTOR_PRIORS = "face_detector/1/priors.npy"


@dataclass(frozen=True)
class Detections:
    """One image's faces: pixel boxes x1 y1 x2 y2, face scores, labels and label probabilities."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    label_scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class ReferencePipeline:
    """decode → preprocess → detect → decode/NMS → crop → classify, with ONNX Runtime on the CPU."""

    def __init__(self, model_repository: Path = DEFAULT_REPOSITORY, threads: int | None = None):
        repository = Path(model_repository)
        postprocess = string_parameters(load_config(repository / "postprocess"))
        self.params = DetectionParams.from_config(postprocess)
        self.labels = config_labels(postprocess["labels"])
        self.priors = load_priors(repository / DETECTOR_PRIORS)
        self.detector = _session(repository / "face_detector" / MODEL_FILE, threads)
        self.classifier = _session(repository / "mask_classifier" / MODEL_FILE, threads)

    def raw_heads(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The detector's (loc, conf) for a batch of BGR images."""
        loc, conf = self.detector.run(list(DETECTOR_OUTPUTS), {DETECTOR_INPUT.tensor: detector_blobs(images)})
        return loc, conf

    def classify(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels and label probabilities of the faces at `boxes` in `image`."""
        if len(boxes) == 0:
            return np.zeros(0, dtype=object), np.zeros(0, dtype=np.float32)
        (probabilities,) = self.classifier.run(
            [CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT.tensor: classifier_batch(image, boxes)})
        return label_faces(probabilities, self.labels)

    def detect_batch(self, images: Sequence[np.ndarray], params: DetectionParams | None = None) -> list[Detections]:
        """Detect and classify faces in BGR uint8 images; one detector run for the whole batch."""
        params = params or self.params
        locs, confs = self.raw_heads(images)
        results = []
        for image, loc, conf in zip(images, locs, confs):
            boxes, scores = detect_faces(loc, conf, self.priors, image.shape[:2], params)
            labels, label_scores = self.classify(image, boxes)
            results.append(Detections(boxes, scores, labels, label_scores))
        return results

    def detect(self, image: np.ndarray, params: DetectionParams | None = None) -> Detections:
        """Detect and classify the faces of one BGR uint8 image."""
        return self.detect_batch([image], params)[0]
