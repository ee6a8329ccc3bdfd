"""The Caffe → ONNX face detector export matches OpenCV running the original Caffe files."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ensemble.export.face_detector import export_face_detector, prior_boxes
from ensemble.export.onnx_io import OPSET, ExportError
from ensemble.export.prototxt import parse_prototxt
from ensemble.layouts import DETECTOR_INPUT, DETECTOR_OUTPUTS
from ensemble.weights import fetch_weights
from ensemble.sample_images import image_variants

BATCH_SIZE = 6  # several images per ONNX run, with a smaller last batch, exercises the dynamic batch dim


@pytest.fixture(scope="module")
def weights():
    return fetch_weights()


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory) -> tuple[Path, dict]:
    """One export per module: every test reads the same model.onnx and priors.npy."""
    out_dir = tmp_path_factory.mktemp("face_detector")
    return out_dir, export_face_detector(weights.prototxt, weights.caffemodel, out_dir)


@pytest.fixture(scope="module")
def opencv_net(weights) -> cv2.dnn.Net:
    """The original Caffe network as OpenCV runs it: the ground truth."""
    return cv2.dnn.readNetFromCaffe(str(weights.prototxt), str(weights.caffemodel))


@pytest.fixture(scope="module")
def all_images(real_images) -> dict[str, np.ndarray]:
    images = {**real_images, **image_variants(real_images)}
    assert len(images) >= 22
    return images


def _blob(image: np.ndarray) -> np.ndarray:
    size = (DETECTOR_INPUT.width, DETECTOR_INPUT.height)
    return cv2.dnn.blobFromImage(image, DETECTOR_INPUT.scale, size, DETECTOR_INPUT.mean)


def test_loc_and_conf_match_opencv_on_real_images_in_batches(exported, opencv_net, all_images):
    out_dir, report = exported
    session = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = list(all_images)
    worst = {"loc": (0.0, ""), "conf": (0.0, "")}
    for start in range(0, len(names), BATCH_SIZE):
        batch_names = names[start:start + BATCH_SIZE]
        blobs = [_blob(all_images[name]) for name in batch_names]
        loc, conf = session.run(list(DETECTOR_OUTPUTS), {DETECTOR_INPUT.tensor: np.concatenate(blobs)})
        assert loc.shape == (len(blobs), report["num_priors"], 4)
        assert conf.shape == (len(blobs), report["num_priors"], 2)
        for i, (name, blob) in enumerate(zip(batch_names, blobs)):
            opencv_net.setInput(blob)
            expected_loc, expected_conf = opencv_net.forward(["mbox_loc", "mbox_conf_flatten"])
            for output, got, expected in (("loc", loc[i], expected_loc), ("conf", conf[i], expected_conf)):
                diff = float(np.abs(got - expected.reshape(got.shape)).max())
                worst[output] = max(worst[output], (diff, name))
    print(f"max abs diff over {len(names)} images: {worst}")
    assert worst["loc"][0] <= 1e-4, worst
    assert worst["conf"][0] <= 1e-4, worst


def test_priors_equal_opencv_priorbox_output(exported, opencv_net, all_images):
    out_dir, report = exported
    priors = np.load(out_dir / "priors.npy")
    opencv_net.setInput(_blob(all_images["grace_hopper"]))
    expected = opencv_net.forward("mbox_priorbox").reshape(2, -1, 4)
    assert priors.dtype == np.float32
    assert priors.shape == expected.shape == (2, report["num_priors"], 4)
    assert np.abs(priors - expected).max() <= 1e-6


def test_model_is_checked_opset_17_with_symbolic_batch(exported):
    out_dir, report = exported
    model = onnx.load(out_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= OPSET >= 17
    assert [i.name for i in model.graph.input] == [DETECTOR_INPUT.tensor]
    assert [o.name for o in model.graph.output] == list(DETECTOR_OUTPUTS)
    for value in [*model.graph.input, *model.graph.output]:
        batch = value.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.HasField("dim_value"), value.name
    image_dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    assert [d.dim_value for d in image_dims] == list(DETECTOR_INPUT.dims)
    assert report["opset"] == OPSET and report["nodes"] == len(model.graph.node)


def test_truncated_caffemodel_raises_and_leaves_existing_files_alone(exported, weights, tmp_path):
    good_dir, _ = exported
    truncated = tmp_path / "truncated.caffemodel"
    payload = weights.caffemodel.read_bytes()
    truncated.write_bytes(payload[:len(payload) // 2])
    out_dir = tmp_path / "out"
    shutil.copytree(good_dir, out_dir)
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}

    with pytest.raises(ExportError, match=re.escape(str(truncated))):
        export_face_detector(weights.prototxt, truncated, out_dir)

    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before  # unchanged, no temp files


def test_unknown_layer_type_raises_naming_prototxt_and_type(weights, tmp_path):
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_text(weights.prototxt.read_text().replace('type: "Softmax"', 'type: "Swish"'))
    out_dir = tmp_path / "out"

    with pytest.raises(ExportError, match=rf"{re.escape(str(prototxt))}.*mbox_conf_softmax.*'Swish'"):
        export_face_detector(prototxt, weights.caffemodel, out_dir)

    assert not out_dir.exists()


def test_prior_boxes_order_clip_and_variance_broadcast():
    # One 1x1 cell of a 50x50 image: min square, sqrt(min*max) square (clipped), then ratio 2 and its flip.
    priors = prior_boxes((1, 1), (50, 50), min_sizes=[30], max_sizes=[120], aspect_ratios=[2, 1],
                         flip=True, clip=True, variances=[0.1], step=50, offset=0.5)
    half_widths = np.array([15, 30, 15 * np.sqrt(2), 15 / np.sqrt(2)]) / 50
    half_heights = np.array([15, 30, 15 / np.sqrt(2), 15 * np.sqrt(2)]) / 50
    expected = np.clip(np.stack([0.5 - half_widths, 0.5 - half_heights,
                                 0.5 + half_widths, 0.5 + half_heights], axis=1), 0, 1)
    assert priors.shape == (2, 4, 4)
    np.testing.assert_allclose(priors[0], expected, atol=1e-7)
    assert np.all(priors[1] == np.float32(0.1))


def test_prototxt_parser_nesting_repetition_comments_and_scalars():
    text = '''
    name: "net"  # trailing comment
    input_shape { dim: 1 dim: 3 }
    layer { name: "a\\"b" type: 'Conv' param { lr_mult: 1.5 } param: { lr_mult: -2e-1 } }
    layer { pool: MAX flip: true clip: False }
    '''
    assert parse_prototxt(text) == {
        "name": ["net"],
        "input_shape": [{"dim": [1, 3]}],
        "layer": [{"name": ['a"b'], "type": ["Conv"], "param": [{"lr_mult": [1.5]}, {"lr_mult": [-0.2]}]},
                  {"pool": ["MAX"], "flip": [True], "clip": [False]}],
    }


@pytest.mark.parametrize("text", ["layer {", "layer }", "name:", "a: b: c", "{ x: 1 }", 'name: "open'])
def test_prototxt_parser_rejects_malformed_text(text):
    with pytest.raises(ValueError):
        parse_prototxt(text)
