"""Export the Keras 2.2.4-tf HDF5 mask classifier to ONNX with h5py alone, so no TensorFlow is needed.

The functional graph in the file's `model_config` is walked layer by layer; each supported layer type
becomes a few ONNX nodes. Inside the graph 4-D tensors are NCHW (one Transpose after the NHWC input)
and every layer's output tensor is named after the Keras layer, so tests can tap any of them.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ensemble.export.onnx_io import IR_VERSION, OPSET, ExportError, save_model
from ensemble.layouts import CLASSIFIER_INPUT, CLASSIFIER_LABELS, CLASSIFIER_OUTPUT

MODEL_FILE = "model.onnx"
BATCH_DIM = "N"
NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)
ACTIVATIONS = {  # Keras activation name -> (ONNX op, attributes); channels are axis 1 in 2-D and NCHW
    "relu": ("Relu", {}),
    "sigmoid": ("Sigmoid", {}),
    "tanh": ("Tanh", {}),
    "softmax": ("Softmax", {"axis": 1}),
}


@dataclass(frozen=True)
class KerasLayer:
    """One layer of the functional config, with its weights keyed by short name ("kernel", "gamma")."""

    name: str
    kind: str
    config: dict
    inbound: tuple[str, ...]
    weights: dict[str, np.ndarray]

    def weight(self, key: str) -> np.ndarray:
        """Fetch a weight, turning a missing one into an ExportError that names the layer."""
        if key not in self.weights:
            raise ExportError(f"layer {self.name!r} ({self.kind}) has no weight {key!r}")
        return self.weights[key]

    def require(self, condition: bool, problem: str) -> None:
        """Refuse configurations the converter does not translate, rather than export them wrongly."""
        if not condition:
            raise ExportError(f"layer {self.name!r} ({self.kind}): unsupported {problem}")


@dataclass(frozen=True)
class KerasModel:
    """What the exporter needs from the HDF5 file, read eagerly so a truncated file fails early."""

    keras_version: str
    layers: tuple[KerasLayer, ...]
    input_layer: str
    output_layer: str


class OnnxGraph:
    """Collects nodes and initializers, tracking each tensor's static per-image shape for padding."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}  # (C, H, W) or (features,), batch excluded

    def const(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; float arrays are stored as float32 like the Keras weights."""
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, shape: tuple[int, ...], **attrs) -> str:
        """Add a node with one output whose per-image shape the caller has worked out."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        self.shapes[output] = shape
        return output


def export_mask_classifier(h5_path: Path, out_dir: Path) -> dict:
    """Write out_dir/model.onnx from the Keras HDF5 file; on any problem raise and write nothing."""
    h5_path, out_path = Path(h5_path), Path(out_dir) / MODEL_FILE
    keras = read_keras_h5(h5_path)
    try:
        model = convert(keras)
    except ExportError as exc:
        raise ExportError(f"{h5_path}: {exc}") from exc
    save_model(model, out_path)
    return {
        "onnx": str(out_path),
        "keras_version": keras.keras_version,
        "layers": dict(Counter(layer.kind for layer in keras.layers)),
        "onnx_nodes": len(model.graph.node),
        "parameters": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
        "opset": OPSET,
    }


def read_keras_h5(h5_path: Path) -> KerasModel:
    """Read config and every weight up front; h5py/JSON failures become one ExportError naming the file."""
    try:
        with h5py.File(h5_path, "r") as h5:
            config = json.loads(_text(h5.attrs["model_config"]))
            keras_version = _text(h5.attrs.get("keras_version", "unknown"))
            return _parse_model(config, h5["model_weights"], keras_version)
    except ExportError as exc:
        raise ExportError(f"{h5_path}: {exc}") from exc
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise ExportError(f"{h5_path}: not a readable Keras HDF5 model: {exc}") from exc


def _text(value: str | bytes) -> str:
    """HDF5 attributes come back as bytes or str depending on how Keras wrote them."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_model(config: dict, weights_root: h5py.Group, keras_version: str) -> KerasModel:
    """Keep only single-input, single-output functional models: that is all the classifier is."""
    graph = config["config"]
    inputs, outputs = graph.get("input_layers"), graph.get("output_layers")
    if config.get("class_name") not in ("Model", "Functional") or len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"expected a functional model with one input and one output, "
                          f"got {config.get('class_name')} with inputs {inputs} and outputs {outputs}")
    layers = tuple(_parse_layer(spec, weights_root) for spec in graph["layers"])
    return KerasModel(keras_version, layers, inputs[0][0], outputs[0][0])


def _parse_layer(spec: dict, weights_root: h5py.Group) -> KerasLayer:
    """Read one layer's config, inbound layer names and weights (a layer without weights has none)."""
    group = weights_root.get(spec["name"])
    weights = {}
    if group is not None:
        for weight_name in group.attrs["weight_names"]:
            short = _text(weight_name).rsplit("/", 1)[-1].split(":")[0]
            weights[short] = np.asarray(group[_text(weight_name)])
    return KerasLayer(spec["name"], spec["class_name"], spec["config"], _inbound(spec), weights)


def _inbound(spec: dict) -> tuple[str, ...]:
    """Keras 2.2.4 lists inbound nodes as [[[layer, node_index, tensor_index, kwargs], ...]]."""
    nodes = spec["inbound_nodes"]
    if not nodes:
        return ()
    if len(nodes) != 1 or any(entry[1:3] != [0, 0] for entry in nodes[0]):
        raise ExportError(f"layer {spec['name']!r}: shared layers and multi-output layers are unsupported")
    return tuple(entry[0] for entry in nodes[0])


def convert(keras: KerasModel) -> onnx.ModelProto:
    """Walk the layers in file order (Keras writes them topologically) and emit the ONNX model."""
    graph = OnnxGraph()
    tensors: dict[str, str] = {}  # Keras layer name -> ONNX tensor holding its output
    for layer in keras.layers:
        converter = CONVERTERS.get(layer.kind)
        if converter is None:
            raise ExportError(f"layer {layer.name!r}: unsupported layer type {layer.kind}")
        missing = [name for name in layer.inbound if name not in tensors]
        if missing:
            raise ExportError(f"layer {layer.name!r} consumes {missing} before they are defined")
        out = CLASSIFIER_OUTPUT if layer.name == keras.output_layer else layer.name
        tensors[layer.name] = converter(graph, layer, [tensors[n] for n in layer.inbound], out)
    return _model(graph, keras)


def _model(graph: OnnxGraph, keras: KerasModel) -> onnx.ModelProto:
    """Wrap the nodes with the NHWC input and [N, labels] output that Triton's config.pbtxt declares."""
    layout, output_shape = CLASSIFIER_INPUT, graph.shapes.get(CLASSIFIER_OUTPUT)
    if output_shape != (len(CLASSIFIER_LABELS),):
        raise ExportError(f"output layer {keras.output_layer!r} has shape {output_shape}, "
                          f"expected ({len(CLASSIFIER_LABELS)},) for labels {CLASSIFIER_LABELS}")
    inputs = [helper.make_tensor_value_info(layout.tensor, TensorProto.FLOAT, [BATCH_DIM, *layout.dims])]
    outputs = [helper.make_tensor_value_info(CLASSIFIER_OUTPUT, TensorProto.FLOAT,
                                             [BATCH_DIM, len(CLASSIFIER_LABELS)])]
    onnx_graph = helper.make_graph(graph.nodes, "mask_classifier", inputs, outputs, graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="ensemble.export.mask_classifier")
    model.doc_string = f"Keras {keras.keras_version} MobileNetV2 mask classifier, converted with h5py"
    return model


def _pair(value: int | list[int] | None, default: int | None = None) -> tuple[int, int]:
    """Keras accepts an int or a [rows, cols] pair for kernel sizes, strides and dilations."""
    value = default if value is None else value
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _same_pads(size: tuple[int, int], kernel, strides, dilation) -> list[int]:
    """TensorFlow's 'same': output ceil(in / stride), any odd padding pixel goes after (bottom/right)."""
    totals = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
              for n, k, s, d in zip(size, kernel, strides, dilation)]
    begins = [total // 2 for total in totals]
    return begins + [total - begin for total, begin in zip(totals, begins)]


def _window_pads(layer: KerasLayer, size: tuple[int, int], kernel, strides, dilation) -> list[int]:
    """ONNX pads [top, left, bottom, right] for Keras 'valid' or 'same' windows."""
    padding = layer.config.get("padding", "valid")
    layer.require(padding in ("valid", "same"), f"padding {padding!r}")
    return _same_pads(size, kernel, strides, dilation) if padding == "same" else [0, 0, 0, 0]


def _window_output(size, pads, kernel, strides, dilation) -> tuple[int, int]:
    """Spatial output size of a convolution or pooling window."""
    return tuple((n + pads[i] + pads[i + 2] - d * (k - 1) - 1) // s + 1
                 for i, (n, k, s, d) in enumerate(zip(size, kernel, strides, dilation)))


def _channels_last(layer: KerasLayer, graph: OnnxGraph, x: str) -> tuple[int, int, int]:
    """Spatial layers must be channels_last in Keras and 4-D here; return the NCHW per-image shape."""
    layer.require(layer.config.get("data_format", "channels_last") == "channels_last",
                  f"data_format {layer.config.get('data_format')!r}")
    layer.require(len(graph.shapes[x]) == 3, f"input of shape {graph.shapes[x]}")
    return graph.shapes[x]


def _activation(graph: OnnxGraph, layer: KerasLayer, linear: str, out: str) -> str:
    """Apply the layer's fused `activation`; callers wrote their linear result to `linear`."""
    name = layer.config.get("activation", "linear")
    if name == "linear":
        return linear
    layer.require(name in ACTIVATIONS, f"activation {name!r}")
    op, attrs = ACTIVATIONS[name]
    return graph.node(op, [linear], out, graph.shapes[linear], **attrs)


def _linear_name(layer: KerasLayer, out: str) -> str:
    """Name the pre-activation tensor so the layer's own output keeps the layer's name."""
    return out if layer.config.get("activation", "linear") == "linear" else f"{out}_linear"


def _convolution(graph: OnnxGraph, layer: KerasLayer, x: str, out: str,
                 kernel: np.ndarray, group: int) -> str:
    """Shared by Conv2D and DepthwiseConv2D; `kernel` is already ONNX [out_ch, in_ch/group, kh, kw]."""
    _, height, width = _channels_last(layer, graph, x)
    size = kernel.shape[2:]
    strides, dilation = _pair(layer.config.get("strides"), 1), _pair(layer.config.get("dilation_rate"), 1)
    pads = _window_pads(layer, (height, width), size, strides, dilation)
    inputs = [x, graph.const(f"{layer.name}/kernel", kernel)]
    if layer.config.get("use_bias", True):
        inputs.append(graph.const(f"{layer.name}/bias", layer.weight("bias")))
    shape = (kernel.shape[0], *_window_output((height, width), pads, size, strides, dilation))
    linear = graph.node("Conv", inputs, _linear_name(layer, out), shape, kernel_shape=list(size),
                        strides=list(strides), dilations=list(dilation), pads=pads, group=group)
    return _activation(graph, layer, linear, out)


def convert_input(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """The graph input is NHWC like Keras; transpose it to NCHW once, here."""
    layout = CLASSIFIER_INPUT
    declared = tuple(layer.config["batch_input_shape"][1:])
    if declared != layout.dims:
        raise ExportError(f"input layer {layer.name!r} has shape {declared}, "
                          f"ensemble/layouts.py says {layout.dims}")
    height, width, channels = declared
    return graph.node("Transpose", [layout.tensor], out, (channels, height, width), perm=list(NHWC_TO_NCHW))


def convert_conv2d(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Keras kernels are [kh, kw, in, out]; ONNX wants [out, in, kh, kw]."""
    layer.require(layer.config.get("groups", 1) == 1, "grouped Conv2D")
    kernel = layer.weight("kernel").transpose(3, 2, 0, 1)
    return _convolution(graph, layer, inputs[0], out, kernel, group=1)


def convert_depthwise_conv2d(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """A depthwise conv is a Conv with one group per input channel; output channel c*mult + m."""
    kh, kw, channels, multiplier = layer.weight("depthwise_kernel").shape
    kernel = layer.weight("depthwise_kernel").reshape(kh, kw, channels * multiplier, 1).transpose(2, 3, 0, 1)
    return _convolution(graph, layer, inputs[0], out, kernel, group=channels)


def convert_batch_norm(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Inference-mode BatchNormalization over the channel axis (Keras' last axis, ONNX axis 1)."""
    shape = graph.shapes[inputs[0]]
    axis = layer.config.get("axis", -1)
    axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
    layer.require(axis in (-1, len(shape)), f"axis {layer.config.get('axis')}")
    mean, variance = layer.weight("moving_mean"), layer.weight("moving_variance")
    gamma = layer.weight("gamma") if layer.config.get("scale", True) else np.ones_like(mean)
    beta = layer.weight("beta") if layer.config.get("center", True) else np.zeros_like(mean)
    params = [graph.const(f"{layer.name}/{key}", value)
              for key, value in (("gamma", gamma), ("beta", beta), ("mean", mean), ("variance", variance))]
    return graph.node("BatchNormalization", [inputs[0], *params], out, shape,
                      epsilon=float(layer.config.get("epsilon", 1e-3)))


def convert_relu(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """ReLU, or Clip(0, max_value) for MobileNetV2's ReLU6."""
    layer.require(not layer.config.get("negative_slope") and not layer.config.get("threshold"),
                  "negative_slope or threshold")
    shape, max_value = graph.shapes[inputs[0]], layer.config.get("max_value")
    if max_value is None:
        return graph.node("Relu", inputs, out, shape)
    low = graph.const(f"{layer.name}/min", np.array(0.0, np.float32))
    high = graph.const(f"{layer.name}/max", np.array(max_value, np.float32))
    return graph.node("Clip", [inputs[0], low, high], out, shape)


def convert_add(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Elementwise sum of the residual branches."""
    shapes = {graph.shapes[x] for x in inputs}
    layer.require(len(shapes) == 1, f"operands of different shapes {sorted(shapes)}")
    return graph.node("Add" if len(inputs) == 2 else "Sum", inputs, out, shapes.pop())


def _zero_padding(padding) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras allows p, (rows, cols) or ((top, bottom), (left, right))."""
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding)


def convert_zero_padding(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Constant zero Pad on H and W of the NCHW tensor."""
    channels, height, width = _channels_last(layer, graph, inputs[0])
    (top, bottom), (left, right) = _zero_padding(layer.config["padding"])
    pads = graph.const(f"{layer.name}/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
    return graph.node("Pad", [inputs[0], pads], out, (channels, height + top + bottom, width + left + right))


def convert_average_pooling(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """AveragePool; Keras leaves 'same' padding out of the average, hence count_include_pad=0."""
    channels, height, width = _channels_last(layer, graph, inputs[0])
    size = _pair(layer.config["pool_size"])
    strides = size if layer.config.get("strides") is None else _pair(layer.config["strides"])
    dilation = (1, 1)
    pads = _window_pads(layer, (height, width), size, strides, dilation)
    shape = (channels, *_window_output((height, width), pads, size, strides, dilation))
    return graph.node("AveragePool", inputs, out, shape, kernel_shape=list(size), strides=list(strides),
                      pads=pads, count_include_pad=0)


def convert_flatten(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Flatten in Keras' NHWC order so the Dense kernel rows line up: transpose back first."""
    shape = graph.shapes[inputs[0]]
    x = inputs[0]
    if len(shape) == 3:
        channels, height, width = _channels_last(layer, graph, x)
        x = graph.node("Transpose", [x], f"{out}_nhwc", (height, width, channels), perm=list(NCHW_TO_NHWC))
    return graph.node("Flatten", [x], out, (math.prod(shape),), axis=1)


def convert_dense(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Gemm with the Keras [in, out] kernel as B, then the fused activation."""
    kernel = layer.weight("kernel")
    layer.require(graph.shapes[inputs[0]] == kernel.shape[:1], f"input of shape {graph.shapes[inputs[0]]}")
    operands = [inputs[0], graph.const(f"{layer.name}/kernel", kernel)]
    if layer.config.get("use_bias", True):
        operands.append(graph.const(f"{layer.name}/bias", layer.weight("bias")))
    linear = graph.node("Gemm", operands, _linear_name(layer, out), kernel.shape[1:])
    return _activation(graph, layer, linear, out)


def convert_dropout(graph: OnnxGraph, layer: KerasLayer, inputs: list[str], out: str) -> str:
    """Dropout is the identity at inference: reuse the input tensor, emit no node."""
    return inputs[0]


Converter = Callable[[OnnxGraph, KerasLayer, list[str], str], str]
CONVERTERS: dict[str, Converter] = {
    "InputLayer": convert_input,
    "Conv2D": convert_conv2d,
    "DepthwiseConv2D": convert_depthwise_conv2d,
    "BatchNormalization": convert_batch_norm,
    "ReLU": convert_relu,
    "Add": convert_add,
    "ZeroPadding2D": convert_zero_padding,
    "AveragePooling2D": convert_average_pooling,
    "Flatten": convert_flatten,
    "Dense": convert_dense,
    "Dropout": convert_dropout,
}
