"""Triton adapter: decoded BGR images -> face-detector input blobs; the numerics live in ensemble/preprocess.py."""
from ensemble.errors import InvalidRequest
from ensemble.layouts import DETECTOR_INPUT
from ensemble.preprocess import detector_blobs
from ensemble.triton import pb


class TritonPythonModel:
    """One blob per image: the images of all requests that share a size are blobbed in one call, then sliced back."""

    def initialize(self, args):
        config = pb.model_config(args)
        (image,), (blob,) = config["input"], config["output"]
        dims = tuple(int(dim) for dim in blob["dims"])
        if dims != DETECTOR_INPUT.dims:
            raise ValueError(f"config.pbtxt declares {blob['name']} dims {dims}, but ensemble/layouts.py makes "
                             f"the detector input {DETECTOR_INPUT.dims}")
        self._image, self._blob = image["name"], blob["name"]

    def execute(self, requests):
        return pb.respond_batched(requests, self._read, self._blobs)

    def _read(self, request):
        images = pb.input_array(request, self._image)  # [B, H, W, 3] uint8: one size per request
        if 0 in images.shape[1:3]:  # dims [-1, -1, 3] let it through; resizing it would fail as a server error
            raise InvalidRequest(f"{self._image} is {images.shape[2]}x{images.shape[1]} pixels; an image needs some")
        return {self._image: images}

    def _blobs(self, inputs):
        return {self._blob: detector_blobs(list(inputs[self._image]))}
