"""Images → model inputs, as ensemble/layouts.py defines them (one OpenCV call per batch)."""
from __future__ import annotations

from typing import Iterator, Sequence

import cv2
import numpy as np

from ensemble.layouts import CLASSIFIER_INPUT, DETECTOR_INPUT, ImageLayout


def _blob(images: Sequence[np.ndarray], layout: ImageLayout, source_channels: str = "BGR") -> np.ndarray:
    """cv2.dnn.blobFromImages computes (resize(img) - mean) * scale for the whole batch."""
    blob = cv2.dnn.blobFromImages(
        list(images), scalefactor=layout.scale, size=(layout.width, layout.height),
        mean=layout.mean, swapRB=layout.channels != source_channels, crop=False,
    )
    return np.ascontiguousarray(blob.transpose(0, 2, 3, 1)) if layout.axes == "NHWC" else blob


def detector_blobs(images: Sequence[np.ndarray]) -> np.ndarray:
    """BGR uint8 images of any size → the face detector's float32 [N, 3, 300, 300] input."""
    return _blob(images, DETECTOR_INPUT)


def crop_boxes(boxes: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Pixel boxes → integer crop windows inside the image, at least one pixel each side."""
    height, width = image_hw
    top_left = np.clip(np.floor(boxes[:, :2]), 0, [width - 1, height - 1])
    bottom_right = np.clip(np.ceil(boxes[:, 2:]), top_left + 1, [width, height])
    return np.concatenate([top_left, bottom_right], axis=1).astype(np.int64)


def classifier_batch(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Crop each pixel box (x1 y1 x2 y2) from a BGR image → the mask classifier's [K, 224, 224, 3] input."""
    if len(boxes) == 0:
        return np.zeros((0, *CLASSIFIER_INPUT.dims), dtype=np.float32)
    crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in crop_boxes(boxes, image.shape[:2])]
    return _blob(crops, CLASSIFIER_INPUT)


def classifier_batches(images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The classifier input of every face of several images (image by image, in box order), `size` faces at a time.

    One batch is cut at a time: a crop is 0.6 MB of float32, so a request's faces all at once (16 images x
    50 faces) would hold half a gigabyte.
    """
    windows = [(image, window) for image, image_boxes in zip(images, boxes)
               for window in crop_boxes(np.asarray(image_boxes).reshape(-1, 4), image.shape[:2])]
    for start in range(0, len(windows), size):
        yield _blob([image[y1:y2, x1:x2] for image, (x1, y1, x2, y2) in windows[start:start + size]],
                    CLASSIFIER_INPUT)
