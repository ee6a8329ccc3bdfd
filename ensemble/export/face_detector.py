"""Export OpenCV's res10 SSD face detector from its Caffe files to ONNX, without a Caffe runtime.

The prototxt gives the layer graph, OpenCV's Caffe reader gives the weights. The graph ends at the
raw SSD heads (`loc`, softmaxed `conf`); prior boxes do not depend on the image, so they are computed
here once and shipped as priors.npy, and decoding + NMS happen in the postprocess model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ensemble.export.onnx_io import IR_VERSION, OPSET, ExportError, save_array, save_model
from ensemble.export.prototxt import Message, first, load_prototxt
from ensemble.layouts import DETECTOR_INPUT, DETECTOR_OUTPUTS

BATCH = "N"  # symbolic batch dim: Triton's dynamic batcher sends any batch up to max_batch_size


class _Weights:
    """The caffemodel's blobs as OpenCV reads them, with errors that name the caffemodel."""

    def __init__(self, prototxt: Path, caffemodel: Path):
        self.path = caffemodel
        try:
            self.net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
        except cv2.error as exc:
            raise self._error("OpenCV cannot read the Caffe weights", exc) from exc

    def _error(self, problem: str, exc: cv2.error) -> ExportError:
        return ExportError(f"{self.path}: {problem}: {str(exc).strip().splitlines()[-1]}")

    def blobs(self, layer: str, count: int) -> list[np.ndarray]:
        """The layer's `count` weight arrays; a wrong count means the caffemodel is not this network's."""
        try:  # OpenCV builds a layer, checking its blobs, only when first asked for it
            layer_blobs = self.net.getLayer(layer).blobs
        except cv2.error as exc:
            raise self._error(f"no usable weights for layer {layer!r}", exc) from exc
        arrays = [np.asarray(b, dtype=np.float32) for b in layer_blobs]
        if len(arrays) != count:
            raise ExportError(f"{self.path}: layer {layer!r} has {len(arrays)} weight blobs, "
                              f"expected {count}")
        return arrays


class _Graph:
    """ONNX nodes and initializers under construction, plus which ONNX tensor holds each Caffe blob."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.tensors: dict[str, str] = {}

    def tensor(self, blob: str) -> str:
        """The ONNX tensor now holding a Caffe blob (in-place layers move a blob to a new tensor)."""
        if blob not in self.tensors:
            raise ValueError(f"bottom {blob!r} is not produced by an earlier layer")
        return self.tensors[blob]

    def constant(self, name: str, array: np.ndarray) -> str:
        """Store a weight array as an initializer; return its tensor name."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "res10_300x300_ssd", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                                 producer_name="ensemble.export.face_detector")


def _pair(param: Message, field: str, default: int) -> list[int]:
    """Caffe states a square kernel/stride/pad once and a rectangular one twice; ONNX wants both."""
    values = param.get(field, [default])
    return values * 2 if len(values) == 1 else values


def _per_channel(array: np.ndarray) -> np.ndarray:
    """Shape a per-channel vector as [C, 1, 1] so it broadcasts over an NCHW tensor."""
    return array.reshape(-1, 1, 1)


def _convolution(graph: _Graph, layer: Message, weights: _Weights) -> str:
    param, name = first(layer, "convolution_param"), first(layer, "name")
    bias_term = first(param, "bias_term", True)
    blobs = weights.blobs(name, 2 if bias_term else 1)
    inputs = [graph.tensor(first(layer, "bottom")), graph.constant(f"{name}/W", blobs[0])]
    if bias_term:
        inputs.append(graph.constant(f"{name}/B", blobs[1].ravel()))
    pad = _pair(param, "pad", 0)
    return graph.node("Conv", inputs, name, kernel_shape=_pair(param, "kernel_size", 1), pads=pad + pad,
                      strides=_pair(param, "stride", 1), dilations=_pair(param, "dilation", 1),
                      group=first(param, "group", 1))


def _batch_norm(graph: _Graph, layer: Message, weights: _Weights) -> str:
    # OpenCV hands back Caffe's raw blobs: running sums of mean and variance plus the moving-average
    # factor they must be divided by (about 1000 here), exactly as Caffe stores them (0 means unset).
    name = first(layer, "name")
    mean_sum, var_sum, factor = weights.blobs(name, 3)
    unscale = 0.0 if factor.flat[0] == 0 else 1.0 / factor.flat[0]
    channels = mean_sum.size
    inputs = [graph.tensor(first(layer, "bottom")),
              graph.constant(f"{name}/scale", np.ones(channels, np.float32)),
              graph.constant(f"{name}/bias", np.zeros(channels, np.float32)),
              graph.constant(f"{name}/mean", (mean_sum.ravel() * unscale).astype(np.float32)),
              graph.constant(f"{name}/var", (var_sum.ravel() * unscale).astype(np.float32))]
    eps = first(first(layer, "batch_norm_param", {}), "eps", 1e-5)
    return graph.node("BatchNormalization", inputs, name, epsilon=eps)


def _scale(graph: _Graph, layer: Message, weights: _Weights) -> str:
    name = first(layer, "name")
    bias_term = first(first(layer, "scale_param", {}), "bias_term", False)
    blobs = weights.blobs(name, 2 if bias_term else 1)
    scaled = graph.node("Mul", [graph.tensor(first(layer, "bottom")),
                                graph.constant(f"{name}/gamma", _per_channel(blobs[0]))],
                        f"{name}/mul" if bias_term else name)
    if not bias_term:
        return scaled
    return graph.node("Add", [scaled, graph.constant(f"{name}/beta", _per_channel(blobs[1]))], name)


def _relu(graph: _Graph, layer: Message, weights: _Weights) -> str:
    slope = first(first(layer, "relu_param", {}), "negative_slope", 0.0)
    bottom, name = graph.tensor(first(layer, "bottom")), first(layer, "name")
    if slope:
        return graph.node("LeakyRelu", [bottom], name, alpha=slope)
    return graph.node("Relu", [bottom], name)


def _pooling(graph: _Graph, layer: Message, weights: _Weights) -> str:
    param = first(layer, "pooling_param")
    if first(param, "pool", "MAX") != "MAX" or first(param, "global_pooling", False):
        raise ValueError("only local MAX pooling is supported")
    pad = _pair(param, "pad", 0)
    # Caffe rounds the output size up; for pad > 0 it also drops a last window starting in the
    # padding, which ONNX ceil_mode does not promise, so refuse that combination rather than guess.
    if any(pad):
        raise ValueError("MAX pooling with padding is not supported (Caffe and ONNX ceil modes differ)")
    return graph.node("MaxPool", [graph.tensor(first(layer, "bottom"))], first(layer, "name"),
                      kernel_shape=_pair(param, "kernel_size", 1), strides=_pair(param, "stride", 1),
                      pads=pad + pad, ceil_mode=1)


def _eltwise(graph: _Graph, layer: Message, weights: _Weights) -> str:
    param = first(layer, "eltwise_param", {})
    if first(param, "operation", "SUM") != "SUM" or "coeff" in param:
        raise ValueError("only Eltwise SUM without coefficients is supported")
    return graph.node("Sum", [graph.tensor(b) for b in layer["bottom"]], first(layer, "name"))


def _normalize(graph: _Graph, layer: Message, weights: _Weights) -> str:
    # SSD's Normalize: x / sqrt(sum over channels of x^2 + eps), then a learned per-channel scale.
    param, name = first(layer, "norm_param", {}), first(layer, "name")
    if first(param, "across_spatial", True):
        raise ValueError("only across_spatial: false is supported")
    (scale,) = weights.blobs(name, 1)
    bottom = graph.tensor(first(layer, "bottom"))
    squares = graph.node("ReduceSumSquare", [bottom], f"{name}/sum_squares", axes=[1], keepdims=1)
    eps = graph.constant(f"{name}/eps", np.float32(first(param, "eps", 1e-10)))
    norm = graph.node("Sqrt", [graph.node("Add", [squares, eps], f"{name}/plus_eps")], f"{name}/norm")
    unit = graph.node("Div", [bottom, norm], f"{name}/unit")
    return graph.node("Mul", [unit, graph.constant(f"{name}/scale", _per_channel(scale))], name)


def _permute(graph: _Graph, layer: Message, weights: _Weights) -> str:
    return graph.node("Transpose", [graph.tensor(first(layer, "bottom"))], first(layer, "name"),
                      perm=first(layer, "permute_param")["order"])


def _flatten(graph: _Graph, layer: Message, weights: _Weights) -> str:
    param = first(layer, "flatten_param", {})
    if first(param, "end_axis", -1) != -1:
        raise ValueError("Flatten with end_axis is not supported")
    return graph.node("Flatten", [graph.tensor(first(layer, "bottom"))], first(layer, "name"),
                      axis=first(param, "axis", 1))


def _concat(graph: _Graph, layer: Message, weights: _Weights) -> str:
    axis = first(first(layer, "concat_param", {}), "axis", 1)
    return graph.node("Concat", [graph.tensor(b) for b in layer["bottom"]], first(layer, "name"), axis=axis)


def _reshape(graph: _Graph, layer: Message, weights: _Weights) -> str:
    # Caffe's 0 (copy this dim) and -1 (infer it) mean the same in ONNX Reshape.
    name = first(layer, "name")
    dims = first(first(layer, "reshape_param"), "shape")["dim"]
    shape = graph.constant(f"{name}/shape", np.array(dims, np.int64))
    return graph.node("Reshape", [graph.tensor(first(layer, "bottom")), shape], name)


def _softmax(graph: _Graph, layer: Message, weights: _Weights) -> str:
    axis = first(first(layer, "softmax_param", {}), "axis", 1)
    return graph.node("Softmax", [graph.tensor(first(layer, "bottom"))], first(layer, "name"), axis=axis)


Converter = Callable[[_Graph, Message, _Weights], str]
CONVERTERS: dict[str, Converter] = {
    "Convolution": _convolution, "BatchNorm": _batch_norm, "Scale": _scale, "ReLU": _relu,
    "Pooling": _pooling, "Eltwise": _eltwise, "Normalize": _normalize, "Permute": _permute,
    "Flatten": _flatten, "Concat": _concat, "Reshape": _reshape, "Softmax": _softmax,
}
# Layers that describe the input or work on the host side rather than becoming ONNX nodes.
HOST_LAYERS = {"Input", "PriorBox", "DetectionOutput"}


def _aspect_ratios(ratios: list[float], flip: bool) -> np.ndarray:
    """Caffe's list of extra aspect ratios: 1 and duplicates dropped, each followed by 1/r if flipped."""
    kept: list[float] = []
    for ratio in ratios:
        if all(abs(ratio - seen) > 1e-6 for seen in [1.0, *kept]):
            kept += [ratio, 1.0 / ratio] if flip else [ratio]
    return np.array(kept, np.float64)


def prior_boxes(feature_size: tuple[int, int], image_size: tuple[int, int], *, min_sizes: Sequence[float],
                max_sizes: Sequence[float] = (), aspect_ratios: Sequence[float] = (), flip: bool = True,
                clip: bool = False, variances: Sequence[float] = (0.1,), step: float = 0.0,
                offset: float = 0.5) -> np.ndarray:
    """One Caffe PriorBox layer as [2, H*W*K, 4]: corner boxes (0..1) then their variances.

    Order per cell is Caffe's: for each min size, the min square, the sqrt(min*max) square, then one
    box per aspect ratio; cells run row-major, so it matches the conv heads' permuted outputs.
    """
    (feature_h, feature_w), (image_h, image_w) = feature_size, image_size
    step_h, step_w = (step, step) if step else (image_h / feature_h, image_w / feature_w)
    mins = np.asarray(min_sizes, np.float64)[:, None]
    squares = [mins]
    if len(max_sizes):
        squares.append(np.sqrt(mins * np.asarray(max_sizes, np.float64)[:, None]))
    ratio_roots = np.sqrt(_aspect_ratios(list(aspect_ratios), flip))[None, :]
    widths = np.concatenate(squares + [mins * ratio_roots], axis=1).ravel()
    heights = np.concatenate(squares + [mins / ratio_roots], axis=1).ravel()
    rows, cols = np.meshgrid(np.arange(feature_h), np.arange(feature_w), indexing="ij")
    center_y = (rows.reshape(-1, 1) + offset) * step_h
    center_x = (cols.reshape(-1, 1) + offset) * step_w
    boxes = np.stack([(center_x - widths / 2) / image_w, (center_y - heights / 2) / image_h,
                      (center_x + widths / 2) / image_w, (center_y + heights / 2) / image_h],
                     axis=-1).reshape(-1, 4)
    if clip:
        boxes = np.clip(boxes, 0.0, 1.0)
    variance = np.broadcast_to(np.asarray(variances, np.float64), boxes.shape)
    return np.stack([boxes, variance]).astype(np.float32)


def _prior_layer(layer: Message, shapes: dict[str, list[int]], graph: _Graph) -> np.ndarray:
    """Evaluate one PriorBox layer from its params and the shapes of its feature map and image."""
    param = first(layer, "prior_box_param")
    feature, image = (shapes[graph.tensor(b)] for b in layer["bottom"])
    return prior_boxes(tuple(feature[2:]), tuple(image[2:]), min_sizes=param["min_size"],
                       max_sizes=param.get("max_size", []), aspect_ratios=param.get("aspect_ratio", []),
                       flip=first(param, "flip", True), clip=first(param, "clip", False),
                       variances=param.get("variance", [0.1]), step=first(param, "step", 0.0),
                       offset=first(param, "offset", 0.5))


def _inferred_shapes(graph: _Graph, inputs: list[onnx.ValueInfoProto]) -> dict[str, list[int]]:
    """Every intermediate tensor's shape, from ONNX shape inference over the graph built so far."""
    inferred = onnx.shape_inference.infer_shapes(graph.model(inputs, []), strict_mode=True)
    return {info.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in info.type.tensor_type.shape.dim]
            for info in [*inferred.graph.input, *inferred.graph.value_info]}


def _network_input(net: Message, layers: list[Message], prototxt: Path) -> tuple[str, list[int]]:
    """The Caffe input blob and its declared shape, from the top-level `input` or an Input layer."""
    if "input" in net:
        shape = first(net, "input_shape")["dim"] if "input_shape" in net else net.get("input_dim", [])
        return first(net, "input"), shape
    layer = next((layer for layer in layers if first(layer, "type") == "Input"), None)
    if layer is None:
        raise ExportError(f"{prototxt}: declares no network input")
    return first(layer, "top"), first(first(layer, "input_param"), "shape")["dim"]


def _check_supported(layers: list[Message], prototxt: Path) -> None:
    """Refuse unknown layer types before any work, naming the file, the layer and its type."""
    for layer in layers:
        kind = first(layer, "type")
        if kind not in CONVERTERS and kind not in HOST_LAYERS:
            raise ExportError(f"{prototxt}: layer {first(layer, 'name')!r} has unsupported type {kind!r}")


def _prior_blobs(layers: list[Message]) -> set[str]:
    """Blobs that depend only on shapes, not pixels: PriorBox outputs and Concats of them."""
    blobs: set[str] = set()
    for layer in layers:
        if first(layer, "type") == "PriorBox" or set(layer.get("bottom", [None])) <= blobs:
            blobs.add(first(layer, "top"))
    return blobs


def _priors(layers: list[Message], priors_blob: str, shapes: dict[str, list[int]],
            graph: _Graph) -> np.ndarray:
    """The DetectionOutput's prior blob: one PriorBox layer, or a Concat of them along the prior axis."""
    by_top = {first(layer, "top"): layer for layer in layers}
    layer = by_top[priors_blob]
    if first(layer, "type") == "PriorBox":
        return _prior_layer(layer, shapes, graph)
    return np.concatenate([_prior_layer(by_top[b], shapes, graph) for b in layer["bottom"]], axis=1)


def _convert_layers(graph: _Graph, layers: list[Message], weights: _Weights, prototxt: Path) -> None:
    """Add every pixel-dependent layer to the graph, naming the layer in any error."""
    prior_blobs = _prior_blobs(layers)
    for layer in layers:
        kind = first(layer, "type")
        if kind in HOST_LAYERS or first(layer, "top") in prior_blobs:
            continue
        try:
            graph.tensors[first(layer, "top")] = CONVERTERS[kind](graph, layer, weights)
        except (ValueError, KeyError, TypeError) as exc:
            raise ExportError(f"{prototxt}: layer {first(layer, 'name')!r} ({kind}): {exc}") from exc


def _add_outputs(graph: _Graph, detection: Message, num_priors: int) -> list[onnx.ValueInfoProto]:
    """Reshape DetectionOutput's loc and conf inputs to [N, P, 4] and [N, P, classes] graph outputs."""
    num_classes = first(first(detection, "detection_output_param"), "num_classes")
    outputs = []
    for output, blob, width in zip(DETECTOR_OUTPUTS, detection["bottom"][:2], (4, num_classes)):
        shape = graph.constant(f"{output}/shape", np.array([0, num_priors, width], np.int64))
        graph.node("Reshape", [graph.tensor(blob), shape], output)
        outputs.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, [BATCH, num_priors, width]))
    return outputs


def _build(prototxt: Path, caffemodel: Path) -> tuple[onnx.ModelProto, np.ndarray]:
    """Translate the Caffe network into the ONNX model and the priors array it is decoded against."""
    net = load_prototxt(prototxt)
    layers = net.get("layer", [])
    _check_supported(layers, prototxt)
    detection = next((layer for layer in layers if first(layer, "type") == "DetectionOutput"), None)
    if detection is None or len(detection.get("bottom", [])) != 3:
        raise ExportError(f"{prototxt}: needs a DetectionOutput layer with loc, conf and prior bottoms")
    blob, shape = _network_input(net, layers, prototxt)
    if tuple(shape[1:]) != DETECTOR_INPUT.dims:
        raise ExportError(f"{prototxt}: input {blob!r} has dims {shape[1:]}, "
                          f"layouts.py expects {DETECTOR_INPUT.dims}")
    weights = _Weights(prototxt, caffemodel)
    graph = _Graph()
    graph.tensors[blob] = DETECTOR_INPUT.tensor
    inputs = [helper.make_tensor_value_info(DETECTOR_INPUT.tensor, TensorProto.FLOAT,
                                            [BATCH, *DETECTOR_INPUT.dims])]
    _convert_layers(graph, layers, weights, prototxt)
    priors = _priors(layers, detection["bottom"][2], _inferred_shapes(graph, inputs), graph)
    outputs = _add_outputs(graph, detection, priors.shape[1])
    return graph.model(inputs, outputs), priors


def export_face_detector(prototxt: Path, caffemodel: Path, out_dir: Path) -> dict:
    """Write out_dir/model.onnx and out_dir/priors.npy atomically; on any error write nothing."""
    prototxt, caffemodel, out_dir = Path(prototxt), Path(caffemodel), Path(out_dir)
    model, priors = _build(prototxt, caffemodel)
    # Priors ship beside the model as one [2, P, 4] array (OpenCV's mbox_priorbox layout: boxes, then
    # variances): postprocess loads it once, the decode stays a few vectorised lines, and the priors
    # stay versioned with the weights they were trained against.
    save_model(model, out_dir / "model.onnx")
    save_array(priors, out_dir / "priors.npy")
    return {"model": str(out_dir / "model.onnx"), "priors": str(out_dir / "priors.npy"),
            "num_priors": int(priors.shape[1]), "opset": OPSET, "nodes": len(model.graph.node)}
