"""Decode, NMS, crops and thresholds: the numerical core shared by Triton's postprocess and the reference."""
import cv2
import numpy as np
import pytest

from ensemble.layouts import CLASSIFIER_INPUT
from ensemble.errors import InvalidRequest
from ensemble.postprocess import (DetectionParams, config_labels, detect_faces, label_faces, override_limits,
                                  padded_outputs)
from ensemble.preprocess import classifier_batch, classifier_batches, crop_boxes
from ensemble.ssd import Priors, decode_boxes, nms, pairwise_iou

DEFAULTS = {"confidence": "0.5", "iou": "0.45", "max_faces": "50", "min_face_size": "8", "pre_nms_top_k": "400"}
LIMITS = {"max_faces_limit": "1000", "pre_nms_top_k_limit": "2000"}


def reference_nms(boxes, scores, threshold):
    """Textbook greedy NMS, one box at a time, to hold the vectorised version against."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(pairwise_iou(boxes[[i]], boxes[[j]])[0, 0] <= threshold for j in kept):
            kept.append(i)
    return kept


def random_boxes(rng, count, size=100.0):
    top_left = rng.uniform(0, size, (count, 2))
    return np.concatenate([top_left, top_left + rng.uniform(1, size / 2, (count, 2))], axis=1).astype(np.float32)


@pytest.mark.parametrize("seed", range(5))
def test_nms_matches_textbook_greedy(seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 60), rng.uniform(0, 1, 60).astype(np.float32)
    assert nms(boxes, scores, 0.3).tolist() == reference_nms(boxes, scores, 0.3)


def test_nms_top_k_limits_candidates_to_the_best():
    rng = np.random.default_rng(7)
    boxes, scores = random_boxes(rng, 40), rng.uniform(0, 1, 40).astype(np.float32)
    kept = nms(boxes, scores, 0.5, top_k=5)
    best = np.argsort(-scores)[:5]
    assert kept.tolist() == best[reference_nms(boxes[best], scores[best], 0.5)].tolist()


def test_iou_of_identical_disjoint_and_half_overlapping_boxes():
    a = np.array([[0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]], np.float32)
    np.testing.assert_allclose(pairwise_iou(a, b), [[1.0, 0.0, 1 / 3]], rtol=1e-6)


def test_decode_with_zero_offsets_returns_the_priors():
    center = np.array([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.05, 0.05]], np.float32)
    priors = Priors(center, np.tile(np.float32([0.1, 0.1, 0.2, 0.2]), (2, 1)))
    np.testing.assert_allclose(decode_boxes(np.zeros((2, 4), np.float32), priors),
                               [[0.4, 0.3, 0.6, 0.7], [0.075, 0.175, 0.125, 0.225]], rtol=1e-6)


def test_decode_applies_variances_to_centre_and_log_size():
    priors = Priors(np.float32([[0.5, 0.5, 0.2, 0.2]]), np.float32([[0.1, 0.1, 0.2, 0.2]]))
    loc = np.float32([[1.0, -1.0, np.log(2) / 0.2, 0.0]])
    cx, cy, w, h = 0.5 + 0.1 * 0.2, 0.5 - 0.1 * 0.2, 0.4, 0.2
    np.testing.assert_allclose(decode_boxes(loc, priors), [[cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]], rtol=1e-5)


def synthetic_heads(face_boxes, face_scores, noise_priors=20):
    """Heads whose priors sit exactly on `face_boxes` (normalised), plus low-score background priors."""
    faces = np.asarray(face_boxes, np.float32)
    centre = np.concatenate([(faces[:, :2] + faces[:, 2:]) / 2, faces[:, 2:] - faces[:, :2]], axis=1)
    background = np.tile(np.float32([[0.5, 0.5, 0.1, 0.1]]), (noise_priors, 1))
    priors = Priors(np.concatenate([centre, background]), np.full((len(faces) + noise_priors, 4), 0.1, np.float32))
    scores = np.concatenate([np.asarray(face_scores, np.float32), np.full(noise_priors, 0.01, np.float32)])
    conf = np.stack([1 - scores, scores], axis=1)
    return np.zeros((len(scores), 4), np.float32), conf, priors


def test_detect_faces_maps_to_pixels_clips_and_orders_by_score():
    params = DetectionParams.from_config(DEFAULTS)
    loc, conf, priors = synthetic_heads([[0.1, 0.1, 0.3, 0.5], [0.6, 0.5, 1.2, 0.9]], [0.7, 0.95])
    boxes, scores = detect_faces(loc, conf, priors, (200, 400), params)
    np.testing.assert_allclose(scores, [0.95, 0.7])
    np.testing.assert_allclose(boxes, [[240, 100, 400, 180], [40, 20, 120, 100]], rtol=1e-5)


def test_detect_faces_applies_confidence_max_faces_and_min_size():
    params = DetectionParams.from_config(DEFAULTS)
    faces = [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.8, 0.8, 0.81, 0.81]]
    loc, conf, priors = synthetic_heads(faces, [0.9, 0.6, 0.99])
    boxes, _ = detect_faces(loc, conf, priors, (100, 100), params)
    assert len(boxes) == 2  # the 1-pixel face is under min_face_size
    assert len(detect_faces(loc, conf, priors, (100, 100), params.override({"confidence": 0.8}))[0]) == 1
    _, (best,) = detect_faces(loc, conf, priors, (100, 100), params.override({"max_faces": 1}))
    assert best == pytest.approx(0.9)  # the best face that passes min_face_size
    assert len(detect_faces(loc, conf, priors, (100, 100), params.override({"min_face_size": 0}))[0]) == 3


def test_boxes_outside_the_image_are_dropped_even_without_a_minimum_size():
    params = DetectionParams.from_config(DEFAULTS).override({"min_face_size": 0})
    loc, conf, priors = synthetic_heads([[1.1, 0.2, 1.3, 0.4], [0.2, -0.5, 0.4, -0.1], [0.9, 0.9, 1.1, 1.1]],
                                        [0.9, 0.9, 0.9])
    boxes, _ = detect_faces(loc, conf, priors, (100, 100), params)
    np.testing.assert_allclose(boxes, [[90, 90, 100, 100]], rtol=1e-5)


def test_detect_faces_with_no_candidate_returns_empty_arrays():
    params = DetectionParams.from_config(DEFAULTS)
    loc, conf, priors = synthetic_heads([[0.1, 0.1, 0.3, 0.3]], [0.2])
    boxes, scores = detect_faces(loc, conf, priors, (100, 100), params)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


@pytest.mark.parametrize("bad", [
    {"confidence": "nan"}, {"confidence": 0}, {"confidence": 1.5}, {"iou": -0.1}, {"iou": True},
    {"max_faces": 0}, {"max_faces": 2.5}, {"max_faces": "many"}, {"min_face_size": -1},
    {"min_face_size": float("inf")}, {"pre_nms_top_k": None},
])
def test_bad_thresholds_raise_a_message_naming_the_parameter(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        DetectionParams.from_config(DEFAULTS).override(bad)


def test_overrides_above_the_configured_limits_are_refused():
    params = DetectionParams.from_config(DEFAULTS)
    limits = override_limits({**DEFAULTS, **LIMITS}, params)
    assert limits == {"max_faces": 1000, "pre_nms_top_k": 2000}
    at_limit = params.override({"max_faces": "1000", "pre_nms_top_k": 2000}, limits)
    assert (at_limit.max_faces, at_limit.pre_nms_top_k) == (1000, 2000)
    for name, value in (("max_faces", 1001), ("pre_nms_top_k", "100000")):
        with pytest.raises(InvalidRequest, match=f"{name} must be at most .* {name}_limit.*got {value!r}"):
            params.override({name: value}, limits)
    assert params.override({"pre_nms_top_k": 100000}).pre_nms_top_k == 100000  # no limits given: none applied


def test_limits_are_required_and_must_allow_the_configs_own_values():
    params = DetectionParams.from_config(DEFAULTS)
    with pytest.raises(ValueError, match="pre_nms_top_k_limit"):
        override_limits({**DEFAULTS, "max_faces_limit": "1000"}, params)
    with pytest.raises(ValueError, match=r"max_faces \(50\) exceeds max_faces_limit \(20\)"):
        override_limits({**DEFAULTS, **LIMITS, "max_faces_limit": "20"}, params)
    with pytest.raises(ValueError, match="max_faces_limit"):
        override_limits({**DEFAULTS, **LIMITS, "max_faces_limit": "0"}, params)


def test_config_thresholds_are_required_and_unknown_request_keys_ignored():
    with pytest.raises(ValueError, match="iou"):
        DetectionParams.from_config({k: v for k, v in DEFAULTS.items() if k != "iou"})
    params = DetectionParams.from_config(DEFAULTS)
    assert params.override({"priority": 3, "confidence": "0.75"}).confidence == 0.75


def test_crop_windows_stay_inside_the_image_and_are_never_empty():
    rng = np.random.default_rng(3)
    boxes = rng.uniform(-50, 250, (200, 4)).astype(np.float32)
    boxes[:, 2:] = boxes[:, :2] + rng.uniform(0, 60, (200, 2))
    windows = crop_boxes(boxes, (120, 160))
    assert (windows[:, :2] >= 0).all() and (windows[:, 2] <= 160).all() and (windows[:, 3] <= 120).all()
    assert (windows[:, 2:] > windows[:, :2]).all()


def test_classifier_batch_is_the_scaled_rgb_resized_crop():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    batch = classifier_batch(image, np.float32([[0, 0, 120, 90]]))
    expected = cv2.resize(image, (224, 224))[..., ::-1].astype(np.float32) / 127.5 - 1
    assert batch.shape == (1, *CLASSIFIER_INPUT.dims)
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)
    assert classifier_batch(image, np.zeros((0, 4), np.float32)).shape == (0, *CLASSIFIER_INPUT.dims)


def test_label_faces_picks_the_most_probable_label():
    labels, scores = label_faces(np.float32([[0.2, 0.8], [0.9, 0.1]]), ("mask", "no_mask"))
    assert labels.tolist() == ["no_mask", "mask"]
    np.testing.assert_allclose(scores, [0.8, 0.9])


def test_outputs_are_padded_to_the_most_faces_and_count_the_real_rows():
    boxes = [np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[9, 9, 10, 10]], np.float32)]
    scores = [np.array([0.9, 0.8], np.float32), np.zeros(0, np.float32), np.array([0.7], np.float32)]
    labels = np.array([b"mask", b"no_mask", b"mask"], dtype=object)
    outputs = padded_outputs(boxes, scores, labels, np.array([0.6, 0.5, 0.4], np.float32), [2, 0, 1])
    assert outputs["NUM_DETECTIONS"].tolist() == [[2], [0], [1]]
    assert outputs["BOXES"].shape == (3, 2, 4) and outputs["BOXES"][2, 0].tolist() == [9, 9, 10, 10]
    assert not outputs["BOXES"][1].any() and not outputs["BOXES"][2, 1].any()  # padding rows are zeros
    assert outputs["LABELS"].tolist() == [[b"mask", b"no_mask"], [b"", b""], [b"mask", b""]]
    np.testing.assert_allclose(outputs["LABEL_SCORES"], [[0.6, 0.5], [0, 0], [0.4, 0]])
    assert padded_outputs([np.zeros((0, 4))], [np.zeros(0)], np.array([], object), np.zeros(0), [0])["BOXES"].shape == (
        1, 0, 4)


def test_classifier_batches_cut_every_face_in_order_a_batch_at_a_time():
    """The same inputs as one classifier_batch per image, concatenated, whatever the batch size; faceless images
    add nothing."""
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8) for i in range(4)]
    boxes = [np.float32([[5, 5, 60, 70], [30, 10, 100, 80], [0, 0, 20, 20]]), np.zeros((0, 4), np.float32),
             np.float32([[10, 20, 50, 60]]), np.float32([[1, 2, 110, 100], [40, 40, 80, 90]])]
    whole = np.concatenate([classifier_batch(image, image_boxes) for image, image_boxes in zip(images, boxes)])
    for size in (1, 2, 4, 16):
        batches = list(classifier_batches(images, boxes, size))
        assert [len(batch) for batch in batches] == [min(size, 6 - start) for start in range(0, 6, size)]
        np.testing.assert_array_equal(np.concatenate(batches), whole)
    assert list(classifier_batches(images[1:2], boxes[1:2], 16)) == []


def test_the_labels_parameter_reads_the_same_with_or_without_spaces():
    assert config_labels("mask,no_mask") == config_labels("mask, no_mask") == ("mask", "no_mask")
