"""Decoding as displayed, header-only limits, and the downscale round trip, without Triton."""

import io

import cv2
import numpy as np
import pytest

from gateway.errors import EmptyBody, ImageError, ImageTooLarge, InvalidImage
from gateway.imaging import (OPENCV, REDUCED_JPEG_READS, TURBOJPEG, boxes_to_original, check_pixel_count,
                             decode_for_inference, decode_image, fit_within, jpeg_reduction)
from gateway_helpers import corrupted, encode, jpeg_with_orientation, matched_iou, png_bomb_header

LIMIT = 40_000_000


def left_bright(height=100, width=200) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 4] = 255
    return image


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def test_exif_orientation_is_applied():
    stored = left_bright()  # 200 wide, 100 high, bright left quarter
    decoded = decode_image(jpeg_with_orientation(stored, 6), LIMIT)  # 6: rotate 90 degrees clockwise to display
    assert decoded.shape == (200, 100, 3)
    assert decoded[:20].mean() > 200 and decoded[-20:].mean() < 50  # the bright left edge is now on top


@pytest.mark.parametrize("make, ext", [
    (lambda: np.full((30, 40), 128, np.uint8), ".png"),  # grayscale
    (lambda: np.full((30, 40, 4), 200, np.uint8), ".png"),  # alpha
    (lambda: np.full((30, 40, 3), 65535, np.uint16), ".png"),  # 16-bit
    (lambda: np.full((30, 40), 40000, np.uint16), ".tiff"),  # 16-bit gray TIFF
    (lambda: np.full((30, 40, 3), 90, np.uint8), ".webp"),
    (lambda: np.full((30, 40, 3), 90, np.uint8), ".bmp"),
])
def test_every_accepted_kind_becomes_8bit_bgr(make, ext):
    decoded = decode_image(encode(make(), ext), LIMIT)
    assert decoded.shape == (30, 40, 3) and decoded.dtype == np.uint8


def test_pixel_bomb_is_refused_from_its_header_alone():
    bomb = png_bomb_header(50_000, 50_000)
    assert len(bomb) < 100
    with pytest.raises(ImageTooLarge, match="50000x50000"):  # the size is the header's: nothing was decoded
        decode_image(bomb, LIMIT)


def test_pixel_limit_is_inclusive():
    assert check_pixel_count(png_bomb_header(8000, 5000), LIMIT) == (8000, 5000)
    with pytest.raises(ImageTooLarge):
        check_pixel_count(png_bomb_header(8001, 5000), LIMIT)


@pytest.mark.parametrize("data, error", [
    (b"", EmptyBody),
    (b"this is not an image at all" * 10, InvalidImage),
    (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), InvalidImage),
])
def test_garbage_is_refused(data, error):
    with pytest.raises(error):
        decode_image(data, LIMIT)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp"])
def test_truncated_images_are_refused(real_images, ext):
    data = encode(real_images["grace_hopper"], ext)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) * 2 // 3], LIMIT)


def test_a_jpeg_carrying_a_complete_thumbnail_is_judged_by_its_own_end(real_images):
    """An embedded thumbnail (a whole JPEG in an APP segment) ends before the main scan: that end does not count."""
    thumbnail = encode(np.full((16, 16, 3), 128, np.uint8), ".jpg")
    segment = _segment(0xE1, b"Exif\0\0" + thumbnail)  # not a valid EXIF block; decoders skip what they cannot parse
    main = encode(real_images["grace_hopper"], ".jpg")
    whole = main[:2] + segment + main[2:]
    assert decode_image(whole, LIMIT).shape == real_images["grace_hopper"].shape
    with pytest.raises(InvalidImage, match="truncated"):
        decode_image(whole[: len(whole) * 2 // 3], LIMIT)


def test_corrupted_images_decode_to_pixels_or_raise_an_image_error(real_images):
    """Whatever a broken link or encoder delivers, the decoder gives 8-bit BGR or an ImageError (a 4xx)."""
    originals = [encode(image, ext) for image in real_images.values() for ext in (".jpg", ".png", ".webp")]
    outcomes = {}
    for how, _, data in corrupted(originals, 1500, seed=1):
        try:
            decoded = decode_for_inference(data, LIMIT, max_side=1280)
        except ImageError as error:
            outcomes[how, type(error).__name__] = outcomes.get((how, type(error).__name__), 0) + 1
            continue
        assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 3 and decoded.pixels.shape[2] == 3
        assert decoded.pixels.size and decoded.width > 0 and decoded.height > 0
        outcomes[how, "decoded"] = outcomes.get((how, "decoded"), 0) + 1
    # every kind of damage was both survived and refused at least once: the sample exercised both paths
    for how in ("anywhere", "header", "spliced"):
        assert outcomes.get((how, "decoded")) and outcomes.get((how, "InvalidImage")), outcomes
    assert outcomes.get(("cut", "InvalidImage")), outcomes


JPEG_SAMPLINGS = {"4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
                  "4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420, "4:1:1": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
                  "4:4:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440}


@pytest.mark.parametrize("factor", [1, 2, 4, 8])
def test_turbojpeg_gives_exactly_the_pixels_opencv_gives(real_images, factor):
    """The faster decoder changes no pixel: chroma subsamplings, progressive, restart markers, gray, odd sizes,
    and every reduced scale, against OpenCV's own read of the same bytes."""
    flags = dict(REDUCED_JPEG_READS).get(factor, cv2.IMREAD_COLOR)
    cases = 0
    for image in real_images.values():
        for source in (image, image[:-3, :-5], cv2.cvtColor(image[:-1], cv2.COLOR_BGR2GRAY)):
            for sampling in JPEG_SAMPLINGS.values():
                for progressive, restart, quality in ((0, 0, 95), (1, 0, 40), (0, 3, 75)):
                    ok, encoded = cv2.imencode(".jpg", source, [
                        cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling,
                        cv2.IMWRITE_JPEG_PROGRESSIVE, progressive, cv2.IMWRITE_JPEG_RST_INTERVAL, restart])
                    # a max_side that makes decode_for_inference read at exactly 1/factor
                    longest = max(source.shape[:2])
                    decoded = decode_for_inference(encoded.tobytes(), LIMIT, longest // factor if factor > 1 else 0)
                    assert decoded.decoder == TURBOJPEG
                    np.testing.assert_array_equal(decoded.pixels, cv2.imdecode(encoded, flags))
                    assert (decoded.height, decoded.width) == source.shape[:2]
                    cases += 1
    assert cases == 2 * 3 * len(JPEG_SAMPLINGS) * 3


def _cmyk_jpeg(image_bgr: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_a_cmyk_jpeg_too_gets_opencvs_pixels(real_images):
    data = _cmyk_jpeg(real_images["grace_hopper"])
    decoded = decode_for_inference(data, LIMIT, 1280)
    assert decoded.decoder == TURBOJPEG
    np.testing.assert_array_equal(decoded.pixels, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    assert np.abs(decoded.pixels.astype(int) - real_images["grace_hopper"]).mean() < 8  # colours survived CMYK


def test_what_turbojpeg_cannot_take_is_decoded_by_opencv(real_images):
    """EXIF (its orientation is OpenCV's to apply), other formats and damaged JPEGs go to OpenCV."""
    image = real_images["grace_hopper"]
    upright = decode_for_inference(jpeg_with_orientation(image, 1), LIMIT, 1280)
    assert upright.decoder == OPENCV and upright.pixels.shape == image.shape
    assert decode_for_inference(encode(image, ".png"), LIMIT, 1280).decoder == OPENCV
    clean = encode(image, ".jpg")
    damaged = bytearray(clean)
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = bytes(40)  # a run of zeros in the middle of the scan
    decoded = decode_for_inference(bytes(damaged), LIMIT, 1280)  # TurboJPEG refuses it, OpenCV decodes what it can
    assert decoded.decoder == OPENCV
    # What OpenCV makes of it is the picture: the rows coded before the damage (the top third, here up to row
    # 255 of 600) are exactly those of the undamaged file, and the damage shows below them.
    undamaged = cv2.imdecode(np.frombuffer(clean, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.pixels.shape == undamaged.shape == image.shape
    third, half = image.shape[0] // 3, image.shape[0] // 2
    np.testing.assert_array_equal(decoded.pixels[:third], undamaged[:third])
    assert np.abs(decoded.pixels[half:].astype(int) - undamaged[half:]).mean() > 20


JFIF = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
COMMENT = _segment(0xFE, b"made by a camera")


@pytest.mark.parametrize("inserted, plain", [
    (b"", True),  # what cv2.imencode writes: JFIF, tables, frame
    (COMMENT + _segment(0xE2, b"ICC_PROFILE\x00" + bytes(40)), True),  # a comment and an ICC profile
    (b"\xff\xff" + COMMENT, True),  # fill bytes before a marker
    (_segment(0xE1, b"Exif\x00\x00" + bytes(20)), False),  # EXIF right after SOI
    (JFIF + COMMENT + _segment(0xE1, b"Exif\x00\x00" + bytes(20)), False),  # EXIF behind other segments
    (_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x/>"), False),  # XMP: OpenCV reads any first APP1
    (b"\xff\xe1\x00\x01", False),  # a segment length shorter than its own length field
    (b"\xff\xd0", False),  # a restart marker before any scan
    (b"\x00\x00", False),  # bytes where a marker must be
])
def test_only_a_jpeg_header_without_app1_that_can_be_followed_goes_to_turbojpeg(real_images, inserted, plain):
    from gateway.imaging import _jpeg_without_exif

    data = encode(real_images["grace_hopper"], ".jpg")
    assert _jpeg_without_exif(data[:2] + inserted + data[2:]) is plain


@pytest.mark.parametrize("longest, max_side, factor", [
    (3840, 1280, 2), (5120, 1280, 4), (2560, 1280, 2), (2559, 1280, 1), (1920, 1280, 1), (20000, 1280, 8),
    (3840, 0, 1),  # no downscaling configured: nothing to gain
])
def test_a_jpeg_is_reduced_only_as_far_as_it_stays_above_max_side(longest, max_side, factor):
    assert jpeg_reduction(longest, max_side) == factor


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_keeps_its_displayed_size():
    """EXIF orientation still applies, and the reported size is the displayed full size, turned if need be."""
    stored = left_bright(1000, 3000)  # 3000 wide: at least twice 1280, so decoded at half scale
    upright = decode_for_inference(jpeg_with_orientation(stored, 1), LIMIT, 1280)
    assert upright.pixels.shape == (500, 1500, 3) and (upright.width, upright.height) == (3000, 1000)
    turned = decode_for_inference(jpeg_with_orientation(stored, 6), LIMIT, 1280)  # rotate 90 degrees to display
    assert turned.pixels.shape == (1500, 500, 3) and (turned.width, turned.height) == (1000, 3000)
    assert turned.pixels[:50].mean() > 200 and turned.pixels[-50:].mean() < 50  # the bright edge is on top
    scaled = fit_within(turned.pixels, 1280, (turned.width, turned.height))
    assert scaled.pixels.shape[:2] == (1280, 427) and scaled.scale_y == pytest.approx(1280 / 3000)


def test_only_jpegs_are_decoded_at_reduced_scale():
    png = decode_for_inference(encode(left_bright(1000, 3000), ".png"), LIMIT, 1280)
    assert png.pixels.shape == (1000, 3000, 3) and (png.width, png.height) == (3000, 1000)
    with pytest.raises(InvalidImage, match="truncated"):
        data = encode(left_bright(1000, 3000), ".jpg")
        decode_for_inference(data[: len(data) // 2], LIMIT, 1280)
    with pytest.raises(EmptyBody):
        decode_for_inference(b"", LIMIT, 1280)


def test_small_images_are_sent_untouched():
    image = np.zeros((600, 512, 3), np.uint8)
    scaled = fit_within(image, 1280)
    assert scaled.pixels is image and not scaled.was_resized


@pytest.mark.parametrize("longest, interpolation", [
    (1920, cv2.INTER_LINEAR),  # 1.5:1 (1080p): bilinear still reads every source pixel
    (2559, cv2.INTER_LINEAR),
    (2560, cv2.INTER_AREA),  # 2:1 and beyond: bilinear would skip pixels, so an area average
    (4000, cv2.INTER_AREA),
])
def test_the_shrink_filter_depends_on_the_ratio(longest, interpolation):
    image = np.random.default_rng(longest).integers(0, 256, (longest * 9 // 16, longest, 3), dtype=np.uint8)
    scaled = fit_within(image, 1280)
    expected = cv2.resize(image, scaled.pixels.shape[1::-1], interpolation=interpolation)
    np.testing.assert_array_equal(scaled.pixels, expected)


def test_bilinear_shrinking_finds_what_the_area_average_finds(real_images, reference_pipeline):
    """Camera-sized frames (real faces upscaled, with sensor noise) shrunk below 2:1 both ways: same faces."""
    rng = np.random.default_rng(0)
    for image in real_images.values():
        for longest in (1600, 1920, 2500):
            factor = longest / max(image.shape[:2])
            frame = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
            frame = np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8)
            sent = fit_within(frame, 1280).pixels
            found = reference_pipeline.detect(sent)
            expected = reference_pipeline.detect(cv2.resize(frame, sent.shape[1::-1], interpolation=cv2.INTER_AREA))
            assert list(found.labels) == list(expected.labels) and len(found) == 1
            assert matched_iou(found.boxes, expected.boxes).min() >= 0.95
            np.testing.assert_allclose(found.scores, expected.scores, atol=0.03)
            np.testing.assert_allclose(found.label_scores, expected.label_scores, atol=0.03)


def test_downscaled_boxes_map_back_to_the_original():
    image = np.zeros((1500, 4000, 3), np.uint8)
    scaled = fit_within(image, 1280)
    assert scaled.pixels.shape == (480, 1280, 3)
    box_in_sent = np.array([[128.0, 48.0, 256.0, 480.0]])
    mapped = boxes_to_original(box_in_sent, scaled, 4000, 1500)
    np.testing.assert_allclose(mapped, [[400.0, 150.0, 800.0, 1500.0]])
