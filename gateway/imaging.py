"""Bytes -> 8-bit BGR pixels as the image is displayed, with cheap header checks before any decoding."""
from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import imagesize
import numpy as np
import simplejpeg

from gateway.errors import EmptyBody, ImageTooLarge, InvalidImage

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_START_OF_SCAN = b"\xff\xda"
JPEG_END_OF_IMAGE = b"\xff\xd9"
# Which library decoded an image (the decode span's image.decoder). TurboJPEG is libjpeg-turbo's own API (through
# simplejpeg): the library and settings OpenCV's JPEG reader uses, so the same pixels, with less overhead around
# them (0.2 ms less per camera frame here; see benchmarks/bench_decode.py).
TURBOJPEG, OPENCV = "turbojpeg", "opencv"


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the image header alone, so a pixel bomb costs a few bytes of parsing."""
    try:
        width, height = imagesize.get(io.BytesIO(data))
    except Exception:  # imagesize raises assorted errors on malformed headers
        width, height = -1, -1
    if width <= 0 or height <= 0:
        raise InvalidImage("not a recognisable JPEG, PNG, WebP, BMP or TIFF image")
    return int(width), int(height)


def check_pixel_count(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Refuse images whose header claims more than `max_pixels` before spending memory on them."""
    width, height = header_size(data)
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    return width, height


def _jpeg_is_truncated(data: bytes) -> bool:
    """A complete JPEG has an end-of-image marker after its last scan (0xFF is byte-stuffed inside scans).

    Searched from the last end-of-image marker on, not for the last scan from the end: that would walk back
    through the whole entropy-coded image (0.15 ms for a 110 kB upload).
    """
    end = data.rfind(JPEG_END_OF_IMAGE)
    return data.find(JPEG_START_OF_SCAN, end + 1 if end >= 0 else 0) != -1


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode to HxWx3 uint8 BGR with EXIF orientation applied; gray, alpha and 16-bit become 8-bit BGR.

    `cv2.IMREAD_COLOR` does all of that in one pass: it rotates by the EXIF Orientation tag, drops alpha,
    replicates gray and scales 16-bit samples down to 8 bits. A JPEG without EXIF, which has none of these,
    goes to TurboJPEG instead.
    """
    return decode_for_inference(data, max_pixels, max_side=0).pixels


def _jpeg_without_exif(data: bytes) -> bool:
    """Whether the JPEG's segments up to its first scan are well-formed and none of them is an APP1 (EXIF's).

    Only such a JPEG goes to TurboJPEG, which ignores the EXIF Orientation that OpenCV applies. Any APP1 counts,
    whatever its label: OpenCV reads orientation from the first one without checking for "Exif". Anything this
    walk cannot follow goes to OpenCV too.
    """
    position = len(JPEG_MAGIC) - 1  # the first marker after start-of-image
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return False
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            return True
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0x01 or 0xD0 <= marker <= 0xD9 or length < 2:  # a marker without a segment is out of place here
            return False
        if marker == 0xE1:
            return False
        position += 2 + length
    return False


def _reduced_shape(width: int, height: int, factor: int) -> tuple[int, int]:
    """(rows, columns) libjpeg gives for a width x height JPEG read at 1/`factor` scale."""
    return -(-height // factor), -(-width // factor)


def _decode(data: bytes, factor: int, width: int, height: int) -> tuple[np.ndarray, str]:
    """(pixels, decoder) of an image whose header says `width` x `height`, a JPEG at 1/`factor` scale."""
    if data.startswith(JPEG_MAGIC):
        if _jpeg_is_truncated(data):
            raise InvalidImage("JPEG data is truncated (no end-of-image marker)")
        if _jpeg_without_exif(data):
            rows, columns = _reduced_shape(width, height, factor)
            try:
                pixels = simplejpeg.decode_jpeg(data, colorspace="BGR", min_height=rows, min_width=columns,
                                                min_factor=factor)
            except ValueError:
                pass  # 12-bit or damaged data: OpenCV makes of it what it did before TurboJPEG was tried
            else:
                if pixels.shape[:2] == (rows, columns):  # else libjpeg and the header check disagree: OpenCV decides
                    return pixels, TURBOJPEG
    flags = dict(REDUCED_JPEG_READS).get(factor, cv2.IMREAD_COLOR)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    if image is None or image.size == 0:
        raise InvalidImage("image data is corrupt or truncated and could not be decoded")
    return image, OPENCV


# libjpeg scales a JPEG down by 2, 4 or 8 while decoding (in the DCT), at a fraction of a full decode's cost.
REDUCED_JPEG_READS = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                      (2, cv2.IMREAD_REDUCED_COLOR_2))


@dataclass(frozen=True)
class DecodedImage:
    """Pixels for inference (a large JPEG possibly decoded at 1/2, 1/4 or 1/8) and the displayed full size."""

    pixels: np.ndarray  # BGR as displayed (EXIF orientation applied)
    width: int  # of the image as displayed, at full resolution
    height: int
    decoder: str  # TURBOJPEG or OPENCV


def jpeg_reduction(longest_side: int, max_side: int) -> int:
    """The largest of 8, 4, 2 that keeps the longer side at least `max_side` (1: decode at full size)."""
    if max_side <= 0:
        return 1
    return next((factor for factor, _ in REDUCED_JPEG_READS if longest_side // factor >= max_side), 1)


def decode_for_inference(data: bytes, max_pixels: int, max_side: int) -> DecodedImage:
    """Like decode_image, but a JPEG at least twice `max_side` is decoded straight to a smaller scale.

    The image is downscaled to `max_side` before inference anyway; libjpeg's scaled decode gets there for
    about half the CPU of a full decode and a resize (a 4K frame: 32 instead of 68 ms here).
    """
    if not data:
        raise EmptyBody("the request carried no image bytes")
    width, height = check_pixel_count(data, max_pixels)
    factor = jpeg_reduction(max(width, height), max_side) if data.startswith(JPEG_MAGIC) else 1
    pixels, decoder = _decode(data, factor, width, height)
    if factor == 1:
        return DecodedImage(pixels, int(pixels.shape[1]), int(pixels.shape[0]), decoder)
    # OpenCV may have turned the image by 90 degrees for its EXIF orientation where the header's size is the stored
    # one (imagesize 1.x; 2.x applies the orientation it finds itself). A result that came out square cannot show it
    # and is taken as upright: the size is then off by less than `factor` pixels. TurboJPEG's results have the
    # header's shape (checked in _decode).
    turned = decoder == OPENCV and tuple(pixels.shape[:2]) != _reduced_shape(width, height, factor)
    return DecodedImage(pixels, *((height, width) if turned else (width, height)), decoder)


@dataclass(frozen=True)
class ScaledImage:
    """The pixels sent to the model and the factors that map its coordinates back to the original."""

    pixels: np.ndarray
    scale_x: float  # sent width / original width
    scale_y: float  # sent height / original height

    @property
    def was_resized(self) -> bool:
        return self.scale_x != 1.0 or self.scale_y != 1.0


def shrink_interpolation(longest_side: int, max_side: int) -> int:
    """Bilinear below 2:1, where it still reads every source pixel; an area average from 2:1 on, where it would not.

    INTER_AREA at a ratio that is not a whole number costs about as much as the decode (1080p to 1280 wide:
    8.1 ms, bilinear 1.7 ms). On 102 frames shrunk both ways the reference pipeline found the same faces and
    labels (IoU >= 0.98, scores within 0.02).
    """
    return cv2.INTER_LINEAR if longest_side < 2 * max_side else cv2.INTER_AREA


def fit_within(image: np.ndarray, max_side: int, full_size: tuple[int, int] | None = None, *,
               interpolation: int | None = None) -> ScaledImage:
    """Downscale (never upscale) so the longer side is at most `max_side`; small images pass untouched.

    `full_size` (width, height): the size `image` stands for when it was decoded at a reduced scale; the
    scale factors are relative to it. `interpolation`: a cv2 filter instead of `shrink_interpolation`'s.
    """
    height, width = image.shape[:2]
    full_width, full_height = full_size or (width, height)
    longest = max(height, width)
    if max_side <= 0 or longest <= max_side:
        sent = image
    else:
        factor = max_side / longest
        new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        if interpolation is None:
            interpolation = shrink_interpolation(longest, max_side)
        sent = cv2.resize(image, new_size, interpolation=interpolation)
    return ScaledImage(sent, sent.shape[1] / full_width, sent.shape[0] / full_height)


def boxes_to_original(boxes: np.ndarray, scaled: ScaledImage, width: int, height: int) -> np.ndarray:
    """Map [N, 4] x1 y1 x2 y2 boxes from the sent image back to the original, clipped to its bounds."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    mapped = boxes / np.array([scaled.scale_x, scaled.scale_y, scaled.scale_x, scaled.scale_y])
    mapped[:, 0::2] = mapped[:, 0::2].clip(0, width)
    mapped[:, 1::2] = mapped[:, 1::2].clip(0, height)
    return mapped
