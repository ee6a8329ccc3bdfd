"""The one place that says what each model's input tensor looks like and how pixels are scaled."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageLayout:
    """How an image becomes a model input: size, channel order, axis order and affine scaling."""

    tensor: str
    height: int
    width: int
    channels: str  # "BGR" or "RGB"
    axes: str  # "NCHW" or "NHWC"
    mean: tuple[float, float, float]  # subtracted per channel, in `channels` order
    scale: float  # multiplied after the mean is subtracted

    @property
    def dims(self) -> tuple[int, int, int]:
        """Per-image dims as Triton's config.pbtxt states them (batch dim excluded)."""
        if self.axes == "NCHW":
            return (3, self.height, self.width)
        return (self.height, self.width, 3)


# OpenCV's res10 SSD face detector: cv2.dnn.blobFromImage(img, 1.0, (300, 300), (104, 177, 123)).
DETECTOR_INPUT = ImageLayout(
    tensor="data", height=300, width=300, channels="BGR", axes="NCHW",
    mean=(104.0, 177.0, 123.0), scale=1.0,
)
DETECTOR_OUTPUTS = ("loc", "conf")  # [N, P, 4] SSD offsets, [N, P, 2] softmax (background, face)

# Keras MobileNetV2 mask classifier: preprocess_input maps RGB 0..255 to x / 127.5 - 1.
CLASSIFIER_INPUT = ImageLayout(
    tensor="input", height=224, width=224, channels="RGB", axes="NHWC",
    mean=(127.5, 127.5, 127.5), scale=1.0 / 127.5,
)
CLASSIFIER_OUTPUT = "probabilities"  # [N, 2] softmax in CLASSIFIER_LABELS order
CLASSIFIER_LABELS = ("mask", "no_mask")
