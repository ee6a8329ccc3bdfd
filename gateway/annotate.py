"""Draw detections on the image for `Accept: image/jpeg`: green for mask, red for no mask, with scores."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from gateway.errors import ApiError

COLOURS_BGR = {"mask": (40, 180, 40), "no_mask": (40, 40, 220)}
UNKNOWN_COLOUR_BGR = (200, 200, 200)
TEXT_BGR = (255, 255, 255)
JPEG_QUALITY = 90


def draw_detections(image_bgr: np.ndarray, boxes: np.ndarray, labels: Sequence[str],
                    label_scores: Sequence[float]) -> np.ndarray:
    """A copy of the image with one labelled rectangle per face; line widths follow the image size."""
    canvas = image_bgr.copy()
    height, width = canvas.shape[:2]
    thickness = max(2, round(max(height, width) / 400))
    font_scale = max(0.5, max(height, width) / 1200)
    for box, label, label_score in zip(np.asarray(boxes).reshape(-1, 4), labels, label_scores):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        colour = COLOURS_BGR.get(label, UNKNOWN_COLOUR_BGR)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)
        caption = f"{label.replace('_', ' ')} {float(label_score):.2f}"
        (text_w, text_h), baseline = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = y1 - text_h - baseline - 4 if y1 - text_h - baseline - 4 >= 0 else y2  # below the box at the top edge
        cv2.rectangle(canvas, (x1, top), (x1 + text_w + 6, top + text_h + baseline + 4), colour, cv2.FILLED)
        cv2.putText(canvas, caption, (x1 + 3, top + text_h + 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, TEXT_BGR, 1,
                    cv2.LINE_AA)
    return canvas


def encode_jpeg(image_bgr: np.ndarray) -> bytes:
    """JPEG bytes of an 8-bit BGR image."""
    ok, encoded = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ApiError("the annotated image could not be encoded")
    return encoded.tobytes()
