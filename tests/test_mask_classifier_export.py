"""The h5py-only ONNX export of the Keras mask classifier: valid, batch-dynamic, numerically faithful."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import matplotlib.cbook
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data

from ensemble.export.mask_classifier import export_mask_classifier
from ensemble.export.onnx_io import OPSET, ExportError
from ensemble.layouts import CLASSIFIER_INPUT, CLASSIFIER_LABELS, CLASSIFIER_OUTPUT
from ensemble.weights import WeightFiles, fetch_weights

SEED = 20240617
PROPERTY_TOLERANCE = 1e-4
# Tapped tensor: the exporter names each layer's output after the Keras layer (NCHW inside the graph).
# block_1_project_BN ends the first strided inverted-residual block, so the path covers ZeroPadding2D,
# strided 'valid' and 'same' convs, depthwise convs, BatchNorm and ReLU6. One block deeper (block_2_add)
# float32 rounding on values near 40 already reaches ~7e-5, too close to the 1e-4 tolerance.
TAPPED_LAYER = "block_1_project_BN"


def session_for(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """A CPU session kept to one thread: the test machine's cores are shared."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def classify(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Run the exported classifier on an NHWC float32 batch."""
    return session.run([CLASSIFIER_OUTPUT], {CLASSIFIER_INPUT.tensor: batch.astype(np.float32)})[0]


def top_face_crop(bgr: np.ndarray, weights: WeightFiles) -> np.ndarray:
    """The original Caffe SSD's best face, cropped and scaled the way the classifier was trained."""
    detector = cv2.dnn.readNetFromCaffe(str(weights.prototxt), str(weights.caffemodel))
    detector.setInput(cv2.dnn.blobFromImage(bgr, 1.0, (300, 300), (104.0, 177.0, 123.0)))
    detections = detector.forward()[0, 0]
    best = detections[detections[:, 2].argmax()]
    height, width = bgr.shape[:2]
    x0, y0, x1, y1 = (best[3:7] * [width, height, width, height]).astype(int)
    crop = bgr[max(y0, 0):min(y1, height), max(x0, 0):min(x1, width)]
    size = (CLASSIFIER_INPUT.width, CLASSIFIER_INPUT.height)
    rgb = cv2.cvtColor(cv2.resize(crop, size), cv2.COLOR_BGR2RGB).astype(np.float32)
    return (rgb - np.float32(CLASSIFIER_INPUT.mean[0])) * np.float32(CLASSIFIER_INPUT.scale)


def sample_faces(weights: WeightFiles) -> dict[str, np.ndarray]:
    """Unmasked faces from images shipped with matplotlib and scikit-image."""
    hopper = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    astronaut = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    return {"grace_hopper": top_face_crop(hopper, weights), "astronaut": top_face_crop(astronaut, weights)}


def random_inputs(count: int) -> np.ndarray:
    """Seeded inputs spanning the whole scaled pixel range [-1, 1]."""
    shape = (count, CLASSIFIER_INPUT.height, CLASSIFIER_INPUT.width, 3)
    return np.random.default_rng(SEED).uniform(-1.0, 1.0, shape).astype(np.float32)


@pytest.fixture(scope="module")
def weights() -> WeightFiles:
    return fetch_weights()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, weights) -> Path:
    return Path(export_mask_classifier(weights.keras_h5, tmp_path_factory.mktemp("mask_classifier"))["onnx"])


@pytest.fixture(scope="module")
def session(exported) -> ort.InferenceSession:
    return session_for(exported)


@pytest.fixture(scope="module")
def faces(weights) -> dict[str, np.ndarray]:
    return sample_faces(weights)


def declared_dims(value: onnx.ValueInfoProto) -> list[str | int]:
    """Symbolic dims by name, fixed dims by size, as Triton sees them."""
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_model_passes_checker_with_declared_io(exported):
    model = onnx.load(exported)
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= OPSET >= 17
    assert [(v.name, declared_dims(v)) for v in model.graph.input] == [(CLASSIFIER_INPUT.tensor,
                                                                        ["N", 224, 224, 3])]
    assert [(v.name, declared_dims(v)) for v in model.graph.output] == [(CLASSIFIER_OUTPUT, ["N", 2])]


def test_batch_dim_is_dynamic_and_rows_independent(session):
    batch = random_inputs(5)
    probabilities = classify(session, batch)
    single = classify(session, batch[:1])
    assert probabilities.shape == (5, 2) and single.shape == (1, 2)
    np.testing.assert_allclose(probabilities[:1], single, atol=1e-6)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name", ["grace_hopper", "astronaut"])
def test_unmasked_faces_are_no_mask(session, faces, name):
    probabilities = classify(session, faces[name][None])[0]
    no_mask = probabilities[CLASSIFIER_LABELS.index("no_mask")]
    print(f"{name}: no_mask probability {no_mask:.6f}")
    assert no_mask >= 0.9


# --- property check: an independent numpy forward pass through the first inverted-residual blocks ----

class KerasWeights:
    """Reads weights and layer configs straight from the HDF5 file, without the exporter's code."""

    def __init__(self, h5: h5py.File):
        self.h5 = h5
        self.configs = {layer["name"]: layer["config"]
                        for layer in json.loads(h5.attrs["model_config"])["config"]["layers"]}

    def __call__(self, layer: str, weight: str) -> np.ndarray:
        return np.asarray(self.h5["model_weights"][layer][layer][f"{weight}:0"], dtype=np.float64)


def windows(x: np.ndarray, size: int, stride: int) -> np.ndarray:
    """All size x size patches of an NHWC batch, as [N, H', W', C, size, size] (a view, no copy)."""
    return np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]


def conv(x: np.ndarray, kernel: np.ndarray, stride: int = 1) -> np.ndarray:
    """'valid' convolution with a Keras [kh, kw, in, out] kernel."""
    return np.einsum("nhwcij,ijco->nhwo", windows(x, kernel.shape[0], stride), kernel, optimize=True)


def depthwise(x: np.ndarray, kernel: np.ndarray, stride: int = 1) -> np.ndarray:
    """'valid' depthwise convolution with a Keras [kh, kw, in, 1] kernel."""
    return np.einsum("nhwcij,ijc->nhwc", windows(x, kernel.shape[0], stride), kernel[..., 0], optimize=True)


def pad(x: np.ndarray, before: int, after: int) -> np.ndarray:
    """Zero padding of H and W, as Keras ZeroPadding2D or 'same' padding does it."""
    return np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


def batch_norm(x: np.ndarray, w: KerasWeights, layer: str) -> np.ndarray:
    """Inference BatchNormalization with the layer's own epsilon."""
    epsilon = w.configs[layer]["epsilon"]
    std = np.sqrt(w(layer, "moving_variance") + epsilon)
    return (x - w(layer, "moving_mean")) / std * w(layer, "gamma") + w(layer, "beta")


def relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 6.0)


def inverted_residual(x: np.ndarray, w: KerasWeights, block: str, stride: int, expand: bool) -> np.ndarray:
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (padded 0/1 if strided, else 'same'), 1x1 project."""
    if expand:
        x = relu6(batch_norm(conv(x, w(f"{block}_expand", "kernel")), w, f"{block}_expand_BN"))
    x = pad(x, 0, 1) if stride == 2 else pad(x, 1, 1)
    x = depthwise(x, w(f"{block}_depthwise", "depthwise_kernel"), stride)
    x = relu6(batch_norm(x, w, f"{block}_depthwise_BN"))
    return batch_norm(conv(x, w(f"{block}_project", "kernel")), w, f"{block}_project_BN")


def numpy_forward_to_block_1(x: np.ndarray, w: KerasWeights) -> np.ndarray:
    """Conv1_pad → Conv1 → bn_Conv1 → Conv1_relu → expanded_conv → block_1, up to block_1_project_BN."""
    x = relu6(batch_norm(conv(pad(x, 0, 1), w("Conv1", "kernel"), stride=2), w, "bn_Conv1"))
    x = inverted_residual(x, w, "expanded_conv", stride=1, expand=False)
    return inverted_residual(x, w, "block_1", stride=2, expand=True)


def tapped_session_for(exported: Path, *layers: str) -> ort.InferenceSession:
    """A session on a test-only copy of the model that also outputs the named layers' tensors."""
    model = onnx.load(exported)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(layer, onnx.TensorProto.FLOAT, None)
                              for layer in layers)
    return session_for(model)


@pytest.fixture(scope="module")
def tapped_session(exported) -> ort.InferenceSession:
    return tapped_session_for(exported, TAPPED_LAYER)


def test_first_blocks_match_independent_numpy_forward(tapped_session, faces, weights):
    batch = np.concatenate([random_inputs(3), np.stack(list(faces.values()))])
    (onnx_nchw,) = tapped_session.run([TAPPED_LAYER], {CLASSIFIER_INPUT.tensor: batch})
    with h5py.File(weights.keras_h5, "r") as h5:
        expected = numpy_forward_to_block_1(batch.astype(np.float64), KerasWeights(h5))
    difference = np.abs(onnx_nchw.transpose(0, 2, 3, 1) - expected).max()
    print(f"{TAPPED_LAYER}: max abs diff ONNX vs numpy {difference:.3e}, max |value| {np.abs(expected).max():.1f}")
    assert expected.shape == (5, 56, 56, 24)
    assert difference <= PROPERTY_TOLERANCE


# --- failures leave nothing behind -----------------------------------------------------------------------

@pytest.fixture
def previous_model(tmp_path) -> Path:
    """An out_dir already holding a model.onnx that a failed export must not touch."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.onnx").write_bytes(b"previous model")
    return out_dir


def assert_untouched(out_dir: Path) -> None:
    assert [p.name for p in out_dir.iterdir()] == ["model.onnx"]
    assert (out_dir / "model.onnx").read_bytes() == b"previous model"


def test_truncated_h5_raises_naming_file_and_writes_nothing(tmp_path, weights, previous_model):
    truncated = tmp_path / "truncated.h5"
    shutil.copyfile(weights.keras_h5, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    with pytest.raises(ExportError, match="truncated.h5"):
        export_mask_classifier(truncated, previous_model)
    assert_untouched(previous_model)


def test_unsupported_layer_type_raises_naming_file_and_layer(tmp_path, weights, previous_model):
    edited = tmp_path / "edited.h5"
    shutil.copyfile(weights.keras_h5, edited)
    with h5py.File(edited, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        config["config"]["layers"][-2]["class_name"] = "SpatialDropout1D"
        h5.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ExportError, match=r"edited\.h5.*'dropout'.*SpatialDropout1D"):
        export_mask_classifier(edited, previous_model)
    assert_untouched(previous_model)
