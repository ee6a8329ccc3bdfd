"""After the project's decode + NMS, the ONNX detector finds what OpenCV's Caffe DetectionOutput finds."""
import cv2
import numpy as np
import pytest

from ensemble.postprocess import detect_faces
from ensemble.ssd import pairwise_iou
from ensemble.weights import fetch_weights
from ensemble.sample_images import image_variants

REPORTED = 0.5  # the detections compared: those above OpenCV's usual face threshold


@pytest.fixture(scope="module")
def caffe_net():
    weights = fetch_weights()
    return cv2.dnn.readNetFromCaffe(str(weights.prototxt), str(weights.caffemodel))


@pytest.fixture(scope="module")
def all_images(real_images):
    images = {**real_images, **image_variants(real_images)}
    assert len(images) >= 22
    return images


def opencv_detections(net, image):
    """OpenCV's DetectionOutput over the original Caffe model: normalised boxes (clipped) and scores."""
    net.setInput(cv2.dnn.blobFromImage(image, 1.0, (300, 300), (104.0, 177.0, 123.0)))
    out = net.forward("detection_out")[0, 0]
    out = out[out[:, 2] > REPORTED]
    return np.clip(out[:, 3:7], 0, 1), out[:, 2]


def test_decode_and_nms_match_opencv_detection_output(caffe_net, all_images, reference_pipeline):
    # DetectionOutput's own settings from deploy.prototxt: confidence 0.01, NMS 0.45, top_k 400, keep_top_k 200.
    caffe_params = reference_pipeline.params.override(
        {"confidence": 0.01, "iou": 0.45, "pre_nms_top_k": 400, "max_faces": 200, "min_face_size": 0})
    compared = 0
    for name, image in all_images.items():
        expected_boxes, expected_scores = opencv_detections(caffe_net, image)
        (loc,), (conf,) = reference_pipeline.raw_heads([image])
        boxes, scores = detect_faces(loc, conf, reference_pipeline.priors, (1, 1), caffe_params)
        boxes, scores = boxes[scores > REPORTED], scores[scores > REPORTED]
        assert len(scores) == len(expected_scores), name
        if len(scores):
            assert np.diag(pairwise_iou(boxes, expected_boxes)).min() >= 0.99, name
            assert np.abs(scores - expected_scores).max() <= 1e-3, name
        compared += len(scores)
    assert compared >= len(all_images) // 2  # most variants still show a face


def test_reference_pipeline_finds_one_unmasked_face_in_each_real_image(reference_pipeline, real_images):
    for name, image in real_images.items():
        result = reference_pipeline.detect(image)
        assert len(result) == 1, name
        assert result.labels.tolist() == ["no_mask"], name
        assert result.label_scores[0] >= 0.9, name
        x1, y1, x2, y2 = result.boxes[0]
        height, width = image.shape[:2]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height, name


def test_a_batch_gives_the_same_detections_as_one_image_at_a_time(reference_pipeline, real_images):
    images = list(real_images.values())
    for single, batched in zip([reference_pipeline.detect(i) for i in images], reference_pipeline.detect_batch(images)):
        np.testing.assert_allclose(batched.boxes, single.boxes, atol=1e-3)
        assert batched.labels.tolist() == single.labels.tolist()


def test_an_image_without_a_face_gives_no_detections(reference_pipeline):
    flat = np.full((240, 320, 3), 128, np.uint8)
    result = reference_pipeline.detect(flat)
    assert len(result) == 0 and result.boxes.shape == (0, 4)
