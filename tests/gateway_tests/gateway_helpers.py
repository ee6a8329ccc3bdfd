"""Small helpers shared by the gateway tests: encoders, EXIF and bomb fixtures, box comparison."""
from __future__ import annotations

import io
import socket
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np

from ensemble.ssd import pairwise_iou

EXIF_ORIENTATION_TAG = 0x0112
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode(image_bgr: np.ndarray, ext: str = ".png") -> bytes:
    ok, encoded = cv2.imencode(ext, image_bgr)
    assert ok
    return encoded.tobytes()


def jpeg_with_orientation(stored_bgr: np.ndarray, orientation: int) -> bytes:
    """A JPEG of `stored_bgr` whose EXIF Orientation tag tells viewers to rotate it for display."""
    from PIL import Image

    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(cv2.cvtColor(stored_bgr, cv2.COLOR_BGR2RGB)).save(buffer, "JPEG", quality=95,
                                                                       exif=exif.tobytes())
    return buffer.getvalue()


def png_bomb_header(width: int, height: int) -> bytes:
    """A few dozen bytes: PNG signature, an IHDR claiming width x height, and a tiny IDAT."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))


def matched_iou(boxes: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """IoU of each expected box with the box at the same rank (both lists are sorted best first)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    expected = np.asarray(expected, dtype=np.float32).reshape(-1, 4)
    assert len(boxes) == len(expected), (boxes, expected)
    return np.diag(pairwise_iou(boxes, expected)) if len(boxes) else np.ones(0)


def json_shape(value):
    """The JSON type skeleton of a value: dict keys and value types, the first element of lists."""
    if isinstance(value, dict):
        return {key: json_shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_shape(value[0])] if value else []
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__
