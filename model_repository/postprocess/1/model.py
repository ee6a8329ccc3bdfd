"""Triton adapter: raw SSD heads -> faces -> the mask classifier over BLS, all faces of a request at once.

The numerics live in ensemble/postprocess.py; this file only moves tensors in and out of Triton.
"""
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ensemble.layouts import CLASSIFIER_INPUT, CLASSIFIER_OUTPUT
from ensemble.postprocess import (DetectionParams, config_labels, detect_faces, label_faces, override_limits,
                                  padded_outputs)
from ensemble.preprocess import classifier_batches
from ensemble.ssd import load_priors, to_host
from ensemble.triton import pb
from ensemble.triton.config import CONFIG_FILE, load_config, type_name


class TritonPythonModel:
    """Decode + NMS per image, then classify every face of the request in as few BLS calls as the batch size allows."""

    def initialize(self, args):
        model_dir = Path(args["model_repository"])
        config = pb.model_config(args)
        parameters = pb.config_parameters(config)
        self._params = DetectionParams.from_config(parameters)
        self._limits = override_limits(parameters, self._params)
        self._labels = config_labels(parameters["labels"])
        self._classifier = parameters["classifier_model"]
        try:
            self._priors = load_priors(model_dir / parameters["priors_file"])
        except FileNotFoundError:
            raise FileNotFoundError(f"{model_dir / parameters['priors_file']} is missing: `python -m ensemble.build` "
                                    "(make models) writes it") from None
        loc_rows = next(int(spec["dims"][0]) for spec in config["input"] if spec["name"] == "LOC")
        if loc_rows != len(self._priors.center):  # else every box would be decoded against the wrong prior
            raise ValueError(f"LOC has {loc_rows} rows in config.pbtxt but {parameters['priors_file']} holds "
                             f"{len(self._priors.center)} priors")
        self._device_priors = {}  # GPU id -> the priors as CuPy arrays, made when heads first arrive on that GPU
        self._chunk = int(parameters["classifier_batch_size"])
        if self._chunk < 1:
            raise ValueError(f"classifier_batch_size must be >= 1, got {self._chunk}")
        classifier = model_dir.parent / self._classifier / CONFIG_FILE
        try:
            classifier_config = load_config(classifier)
        except OSError:  # a repository Triton copies model by model (cloud storage): the repository tests keep them
            pb_utils.Logger.log_warn(f"{classifier} is not readable from here: the classifier's tensors and "
                                     "batch size were not checked against postprocess's")
        else:
            _check_classifier(self._classifier, classifier_config, self._labels, self._chunk)

    def execute(self, requests):
        # Per request, not joined: a BLS call carries one request's trace, and each request's classifier span
        # belongs under its own postprocess span.
        return pb.respond_each(requests, self._detect)

    def _detect(self, request):
        params = self._params.override(pb.request_parameters(request), self._limits)
        locs, confs, priors = self._heads(request)
        images = _host(pb_utils.get_input_tensor_by_name(request, "IMAGE"))
        faces = [detect_faces(loc, conf, priors, image.shape[:2], params)
                 for loc, conf, image in zip(locs, confs, images)]
        boxes = [to_host(found).astype(np.float32) for found, _ in faces]
        scores = [to_host(score).astype(np.float32) for _, score in faces]
        crops = classifier_batches(images, boxes, self._chunk)
        labels, label_scores = label_faces(self._classify(crops, request), self._labels)
        counts = [len(image_boxes) for image_boxes in boxes]
        encoded = np.array([label.encode() for label in labels], dtype=object)
        return padded_outputs(boxes, scores, encoded, label_scores, counts)

    def _heads(self, request):
        """LOC, CONF and the priors where the detector left the heads: numpy on the CPU, CuPy (DLPack) on the GPU.

        On the GPU, the work stays on the device that holds the heads: the Python backend keeps an input on the GPU
        that produced it, which on a multi-GPU host need not be this instance's own.
        """
        tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in ("LOC", "CONF")]
        if all(tensor.is_cpu() for tensor in tensors):
            return tensors[0].as_numpy(), tensors[1].as_numpy(), self._priors
        cupy = _cupy("LOC/CONF")
        on_gpu = [None if tensor.is_cpu() else cupy.from_dlpack(tensor.to_dlpack()) for tensor in tensors]
        device = next(array.device for array in on_gpu if array is not None)
        device.use()  # this thread's kernels and allocations go to the heads' GPU
        if device.id not in self._device_priors:
            self._device_priors[device.id] = self._priors.on(cupy)
        loc, conf = (array if array is not None else cupy.asarray(tensor.as_numpy())
                     for array, tensor in zip(on_gpu, tensors))
        return loc, conf, self._device_priors[device.id]

    def _classify(self, batches, request):
        """Class probabilities of all crops: one BLS call per classifier batch, traced under this request."""
        probabilities = [np.zeros((0, len(self._labels)), np.float32)]
        for crops in batches:
            call = pb_utils.InferenceRequest(
                model_name=self._classifier, requested_output_names=[CLASSIFIER_OUTPUT],
                inputs=[pb_utils.Tensor(CLASSIFIER_INPUT.tensor, crops)],
                trace=request.trace(), parameters=pb.bls_parameters(request),
                preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU))
            response = call.exec()
            if response.has_error():
                raise RuntimeError(f"{self._classifier}: {response.error().message()}")
            probabilities.append(pb_utils.get_output_tensor_by_name(response, CLASSIFIER_OUTPUT).as_numpy())
        return np.concatenate(probabilities)


def _check_classifier(name: str, config, labels: tuple[str, ...], batch_size: int) -> None:
    """The crops are cut and named as ensemble/layouts.py says, scored once per label, and sent classifier_batch_size
    at a time: the classifier's config.pbtxt must agree (else only requests with faces would fail, at run time)."""
    if batch_size > config.max_batch_size:
        raise ValueError(f"classifier_batch_size is {batch_size} but {name}'s max_batch_size is "
                         f"{config.max_batch_size}: each BLS call would be refused")
    declared = [(tensor.name, type_name(tensor), tuple(tensor.dims)) for tensor in config.input]
    expected = [(CLASSIFIER_INPUT.tensor, "TYPE_FP32", CLASSIFIER_INPUT.dims)]
    outputs = [(tensor.name, type_name(tensor), tuple(tensor.dims)) for tensor in config.output]
    scored = [(CLASSIFIER_OUTPUT, "TYPE_FP32", (len(labels),))]
    if declared != expected or outputs != scored:
        raise ValueError(f"{name}'s config.pbtxt declares inputs {declared} and outputs {outputs}, but "
                         f"ensemble/layouts.py cuts crops for {expected} and postprocess reads {scored} "
                         f"(one probability per label of {','.join(labels)})")


def _host(tensor) -> np.ndarray:
    """A numpy copy of a tensor, wherever it arrived."""
    return tensor.as_numpy() if tensor.is_cpu() else _cupy(tensor.name()).from_dlpack(tensor.to_dlpack()).get()


def _cupy(name: str):
    """CuPy, needed only when a tensor arrives in GPU memory (FORCE_CPU_ONLY_INPUT_TENSORS is "no")."""
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(f"{name} arrived in GPU memory but CuPy is not installed; install it or set "
                           "FORCE_CPU_ONLY_INPUT_TENSORS to \"yes\" in config.pbtxt") from exc
    return cupy
