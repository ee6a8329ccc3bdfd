"""The gateway's decode for inference on camera-sized JPEGs: a full decode + resize vs libjpeg's scaled decode,
and its shrink filter vs an area average; and its JPEG decoder (TurboJPEG) vs OpenCV's imdecode.

The gateway downscales every image to GATEWAY_MAX_SIDE (1280) before Triton. A JPEG at least twice that
size is decoded straight to 1/2, 1/4 or 1/8 scale (gateway.imaging.decode_for_inference) instead of at
full size and then resized; what is left to shrink below 2:1 is shrunk bilinearly
(gateway.imaging.shrink_interpolation), not with INTER_AREA. This measures the three ways side by side,
interleaved, on a real photograph upscaled to common camera sizes:

    python -m benchmarks.bench_decode                 # 1080p, 1440p, 4K; 15 rounds
    python -m benchmarks.bench_decode --rounds 40 --output decode.json

Per size: the median milliseconds of each way (one thread, this process) and the gateway's way's ratio to
the other two. The 1080p frame is below 2 x 1280, so it is decoded at full size either way.

Decoders: the gateway hands a JPEG without EXIF to libjpeg-turbo's TurboJPEG API (simplejpeg), which gives
exactly OpenCV's pixels (tests/gateway_tests/test_gateway_imaging.py); both decode the `make bench` bodies
(benchmarks/image_set.py at quality 95) and the camera frames at full size, interleaved.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import cv2
import numpy as np

from benchmarks.common import machine_info, machine_line, uptime_line, write_json
from benchmarks.image_set import benchmark_images
from gateway.imaging import TURBOJPEG, decode_for_inference, decode_image, fit_within, jpeg_reduction
from gateway.settings import Settings

SCHEMA = "facemask.bench.decode/1"
SIZES = {"1080p": (1920, 1080), "1440p": (2560, 1440), "4K": (3840, 2160)}
JPEG_QUALITY = 90


def camera_frames() -> dict[str, bytes]:
    """grace_hopper upscaled to each camera size and JPEG-encoded, as a camera would upload it."""
    photo = benchmark_images()["grace_hopper"]
    return {name: cv2.imencode(".jpg", cv2.resize(photo, size, interpolation=cv2.INTER_CUBIC),
                               [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1].tobytes()
            for name, size in SIZES.items()}


def run(*, rounds: int = 15, log=print) -> dict:
    settings = Settings()
    ways = {
        "full_decode": lambda data: fit_within(decode_image(data, settings.max_pixels), settings.max_side),
        "area_shrink": lambda data: _scaled_decode(data, settings, area_shrink=True),
        "scaled_decode": lambda data: _scaled_decode(data, settings),
    }
    document = {"schema": SCHEMA, "machine": machine_info(), "max_side": settings.max_side, "rounds": rounds,
                "jpeg_quality": JPEG_QUALITY, "frames": {}}
    frames = camera_frames()
    for name, data in frames.items():
        timings = {way: [] for way in ways}
        for way in ways.values():  # warm-up, and both ways must send the same size
            way(data)
        sent = {way: function(data).pixels.shape for way, function in ways.items()}
        if len(set(sent.values())) != 1:
            raise RuntimeError(f"{name}: the two ways send different sizes {sent}")
        for _ in range(rounds):
            for way, function in ways.items():
                began = time.perf_counter()
                function(data)
                timings[way].append((time.perf_counter() - began) * 1e3)
        width, height = SIZES[name]
        medians = {way: round(float(np.median(values)), 2) for way, values in timings.items()}
        document["frames"][name] = {"width": width, "height": height, "bytes": len(data),
                                    "reduction": jpeg_reduction(max(width, height), settings.max_side),
                                    "sent": list(sent["full_decode"][:2]), "median_ms": medians,
                                    "ratio": round(medians["scaled_decode"] / medians["full_decode"], 3),
                                    "ratio_to_area_shrink": round(medians["scaled_decode"] / medians["area_shrink"], 3)}
        log(f"{name:6s} {width}x{height} ({len(data) // 1024} KiB, 1/{document['frames'][name]['reduction']}): "
            f"full decode {medians['full_decode']:6.1f} ms, scaled decode + area shrink "
            f"{medians['area_shrink']:6.1f} ms, the gateway's way {medians['scaled_decode']:6.1f} ms "
            f"(ratios {document['frames'][name]['ratio']}, {document['frames'][name]['ratio_to_area_shrink']})")
    document["decoders"] = compare_decoders(frames, rounds, log)
    document["uptime_end"] = uptime_line()
    return document


def compare_decoders(camera: dict[str, bytes], rounds: int, log=print) -> dict:
    """OpenCV's imdecode vs the gateway's decode (TurboJPEG for these EXIF-free JPEGs), full size, interleaved."""
    bench_set = [cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                 for image in benchmark_images().values()]
    sets = {"bench bodies (q95)": bench_set, **{name: [data] for name, data in camera.items()}}
    max_pixels = Settings().max_pixels
    ways = {"opencv": lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
            TURBOJPEG: lambda data: decode_for_inference(data, max_pixels, 0)}
    results = {}
    for name, bodies in sets.items():
        for data in bodies:
            if decode_for_inference(data, max_pixels, 0).decoder != TURBOJPEG:
                raise RuntimeError(f"{name}: the gateway did not decode a plain JPEG with TurboJPEG")
        timings = {way: [] for way in ways}
        for _ in range(rounds):
            for way, function in ways.items():
                began = time.perf_counter()
                for data in bodies:
                    function(data)
                timings[way].append((time.perf_counter() - began) * 1e3 / len(bodies))
        medians = {way: round(float(np.median(values)), 3) for way, values in timings.items()}
        results[name] = {"images": len(bodies), "median_ms_per_image": medians,
                         "ratio": round(medians[TURBOJPEG] / medians["opencv"], 3)}
        log(f"decoders, {name}: OpenCV {medians['opencv']:.2f} ms, TurboJPEG {medians[TURBOJPEG]:.2f} ms per image "
            f"(ratio {results[name]['ratio']})")
    return results


def _scaled_decode(data: bytes, settings: Settings, area_shrink: bool = False):
    """What the gateway does for a JSON answer (gateway.detection.detect_in_image); `area_shrink`: with
    INTER_AREA for the shrink, as it did before bilinear below 2:1."""
    decoded = decode_for_inference(data, settings.max_pixels, settings.max_side)
    return fit_within(decoded.pixels, settings.max_side, (decoded.width, decoded.height),
                      interpolation=cv2.INTER_AREA if area_shrink else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per frame size (default 15)")
    parser.add_argument("--output", help="write the result document here (JSON)")
    args = parser.parse_args(argv)
    document = run(rounds=args.rounds)
    print(f"machine: {machine_line(document['machine'])}")
    if args.output:
        write_json(args.output, document)
        print(f"result: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
