"""The mask_detection ensemble in a real tritonserver equals the in-process reference pipeline."""
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Queue

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from ensemble.reference import Detections
from ensemble.sample_images import image_variants, real_images
from ensemble.triton.config import load_config
from ensemble.ssd import pairwise_iou

pytestmark = pytest.mark.triton

MODEL = "mask_detection"
IMAGES = {**real_images(), **image_variants(real_images())}
NO_FACE = np.full((240, 320, 3), 40, np.uint8)
MIN_IOU, SCORE_TOLERANCE = 0.99, 1e-3


@pytest.fixture(scope="module")
def client(triton_server):
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        yield client


def image_input(batch: np.ndarray, datatype: str = "UINT8") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("IMAGE", list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


def detect(client, images: list[np.ndarray], parameters=None) -> list[Detections]:
    """One request carrying `images` (same size), split back into per-image detections."""
    result = client.infer(MODEL, [image_input(np.stack(images))], parameters=parameters)
    counts = result.as_numpy("NUM_DETECTIONS")[:, 0]
    boxes, scores = result.as_numpy("BOXES"), result.as_numpy("SCORES")
    labels, label_scores = result.as_numpy("LABELS"), result.as_numpy("LABEL_SCORES")
    return [Detections(boxes[i, :n], scores[i, :n], np.array([label.decode() for label in labels[i, :n]], object),
                       label_scores[i, :n]) for i, n in enumerate(counts)]


def box_agreement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, except that identical boxes agree fully even when clipping left them with zero area."""
    identical = np.abs(a[:, None, :] - b[None, :, :]).max(axis=-1) < 1e-3
    return np.where(identical, 1.0, pairwise_iou(a, b))


def assert_same(served: Detections, reference: Detections) -> None:
    """Same faces, matched by best IoU: faces whose scores tie to float rounding may come in either order."""
    assert len(served) == len(reference)
    if len(reference):
        overlaps = box_agreement(reference.boxes, served.boxes)
        match = overlaps.argmax(axis=1)
        assert sorted(match) == list(range(len(served))), "faces do not pair up one to one"
        assert overlaps[np.arange(len(match)), match].min() >= MIN_IOU
        served = Detections(*(field[match] for field in (served.boxes, served.scores, served.labels,
                                                          served.label_scores)))
    assert list(served.labels) == list(reference.labels)
    np.testing.assert_allclose(served.scores, reference.scores, atol=SCORE_TOLERANCE)
    np.testing.assert_allclose(served.label_scores, reference.label_scores, atol=SCORE_TOLERANCE)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_equals_reference_pipeline(name, client, reference_pipeline):
    (served,) = detect(client, [IMAGES[name]])
    assert_same(served, reference_pipeline.detect(IMAGES[name]))


@pytest.mark.parametrize("name", ["grace_hopper", "grace_hopper/high_contrast"])
def test_request_parameters_override_config_thresholds(name, client, reference_pipeline):
    """At confidence 0.1 the high-contrast variant keeps max_faces (50) faces: four classifier chunks of 16."""
    image = IMAGES[name]
    served = {c: detect(client, [image], parameters={"confidence": c})[0] for c in (0.1, 0.99)}
    for confidence, detections in served.items():
        assert_same(detections, reference_pipeline.detect(image, reference_pipeline.params.override(
            {"confidence": confidence})))
    assert len(served[0.1]) > len(served[0.99]) >= 1


def test_faces_of_a_request_reach_the_classifier_in_batches_of_classifier_batch_size(client):
    before = client.get_inference_statistics("mask_classifier").model_stats[0]
    (served,) = detect(client, [IMAGES["grace_hopper"]], parameters={"confidence": 0.1})
    after = client.get_inference_statistics("mask_classifier").model_stats[0]
    chunk = int(client.get_model_config("postprocess").config.parameters["classifier_batch_size"].string_value)
    assert len(served) > chunk
    assert after.inference_count - before.inference_count == len(served)
    assert after.execution_count - before.execution_count == -(-len(served) // chunk)


def test_batch_of_images_is_padded_to_the_most_faces(client, reference_pipeline):
    hopper = IMAGES["grace_hopper"]
    images = [hopper, np.full_like(hopper, 40), IMAGES["grace_hopper/hflip"]]
    result = client.infer(MODEL, [image_input(np.stack(images))], parameters={"confidence": 0.2})
    counts = result.as_numpy("NUM_DETECTIONS")[:, 0]
    assert counts[1] == 0 and result.as_numpy("BOXES").shape == (3, counts.max(), 4)
    assert not result.as_numpy("SCORES")[1].any() and set(result.as_numpy("LABELS")[1]) == {b""}
    params = reference_pipeline.params.override({"confidence": 0.2})
    for served, image in zip(detect(client, images, parameters={"confidence": 0.2}), images):
        assert_same(served, reference_pipeline.detect(image, params))


def test_concurrent_requests_of_mixed_sizes(client, reference_pipeline):
    names = sorted(IMAGES, key=lambda name: IMAGES[name].shape)[::2][:16]
    assert len({IMAGES[name].shape for name in names}) > 4
    with ThreadPoolExecutor(len(names)) as pool:
        served = list(pool.map(lambda name: detect(client, [IMAGES[name]])[0], names))
    for name, detections in zip(names, served):
        assert_same(detections, reference_pipeline.detect(IMAGES[name]))


def test_same_size_frames_that_queue_together_are_preprocessed_in_one_execution(client, reference_pipeline):
    # Several cameras of one resolution: their frames meet in preprocess's queue and are blobbed together.
    names = [name for name in sorted(IMAGES) if IMAGES[name].shape == IMAGES["grace_hopper"].shape][:4]
    frames = [IMAGES[name] for name in names] * 4
    expected = [reference_pipeline.detect(frame) for frame in frames]

    def preprocess_counts():
        stats = client.get_inference_statistics("preprocess").model_stats[0]
        return stats.inference_count, stats.execution_count

    for _ in range(5):  # the batcher joins only requests that arrive while an execution runs
        inferences, executions = preprocess_counts()
        with ThreadPoolExecutor(len(frames)) as pool:
            served = list(pool.map(lambda frame: detect(client, [frame])[0], frames))
        for detections, reference in zip(served, expected):
            assert_same(detections, reference)
        now_inferences, now_executions = preprocess_counts()
        if now_executions - executions < now_inferences - inferences:
            return
    pytest.fail("16 concurrent same-size frames never shared a preprocess execution in 5 tries")


def _failures(metrics_url: str) -> dict[str, float]:
    """Triton's nv_inference_request_failure per model, summed over reasons."""
    text = requests.get(metrics_url, timeout=10).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nv_inference_request_failure_total":  # the parser names counter samples so
                counts[sample.labels["model"]] = counts.get(sample.labels["model"], 0) + sample.value
    return counts


def test_a_burst_beyond_the_detectors_queue_is_refused_at_once_and_counted_on_the_ensemble_only(
        client, triton_server, model_repository):
    """The shipped queue bound: frames beyond it are refused as UNAVAILABLE (the gateway's 429), not queued.

    Triton counts the refusal on the ensemble (reason OTHER), not on face_detector, whose queue refused it: the
    TritonInferenceFailures alert reads the composing models only, so overload reaches GatewayTritonOverloaded.
    """
    queue = load_config(model_repository / "face_detector").dynamic_batching.default_queue_policy.max_queue_size
    assert queue > 0
    served = client.get_model_config("face_detector").config.instance_group
    if any(group.kind == group.KIND_GPU for group in served):  # there preprocess, not the detector, sets the pace
        pytest.skip("face_detector runs on a GPU: its queue does not fill before preprocess's")
    burst = 4 * queue
    frame = image_input(NO_FACE[None])
    failures_before = _failures(triton_server.metrics_url)
    outcomes: "Queue[InferenceServerException | None]" = Queue()
    for _ in range(burst):
        client.async_infer(MODEL, [frame], lambda result, error: outcomes.put(error), client_timeout=120)
    errors = [outcomes.get(timeout=180) for _ in range(burst)]
    refused = [error for error in errors if error is not None]
    assert refused, f"{burst} requests at once never overflowed a queue of {queue}"
    assert {(error.status(), "Exceeds maximum queue size" in error.message()) for error in refused} == {
        ("StatusCode.UNAVAILABLE", True)}
    assert burst - len(refused) >= queue  # a full queue's worth was served
    assert len(detect(client, [IMAGES["grace_hopper"]])[0]) == 1  # and the server carries on
    deadline = time.monotonic() + 30  # Triton's metrics lag its answers by up to its metrics interval
    while not (grown := _grown(_failures(triton_server.metrics_url), failures_before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert grown == {MODEL}


def _grown(now: dict[str, float], before: dict[str, float]) -> set[str]:
    return {model for model, count in now.items() if count > before.get(model, 0)}


def test_image_without_faces_gives_empty_outputs(client):
    result = client.infer(MODEL, [image_input(NO_FACE[None])])
    shapes = {name: result.as_numpy(name).shape for name in ("BOXES", "SCORES", "LABELS", "LABEL_SCORES")}
    assert shapes == {"BOXES": (1, 0, 4), "SCORES": (1, 0), "LABELS": (1, 0), "LABEL_SCORES": (1, 0)}
    assert result.as_numpy("NUM_DETECTIONS").tolist() == [[0]]


@pytest.mark.parametrize("bad_input", [
    image_input(NO_FACE[None].astype(np.float32), "FP32"),      # wrong dtype
    image_input(NO_FACE[None, :, :, 0]),                         # no channel axis
    image_input(np.zeros((1, 64, 64, 4), np.uint8)),             # four channels
], ids=["float32", "grayscale_2d", "bgra"])
def test_malformed_input_is_rejected_and_server_stays_healthy(bad_input, client):
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, [bad_input])
    assert client.is_server_ready()
    assert detect(client, [IMAGES["astronaut"]])[0].labels.size == 1


@pytest.mark.parametrize("parameters", [{"confidence": 2.0}, {"max_faces": "many"}, {"iou": 0},
                                        {"max_faces": 1001}, {"pre_nms_top_k": 100000}])
def test_bad_parameter_value_is_the_callers_error(parameters, client):
    """Out of range or above the model's limit (max_faces_limit, pre_nms_top_k_limit): the caller's error."""
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(IMAGES["astronaut"][None])], parameters=parameters)
    assert next(iter(parameters)) in error.value.message()
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.is_server_ready()


def test_overrides_up_to_the_limits_are_served(client):
    (found,) = detect(client, [IMAGES["astronaut"]], parameters={"max_faces": 1000, "pre_nms_top_k": 2000})
    assert found.labels.size == 1


@pytest.mark.parametrize("shape, message", [((1, 0, 64, 3), "IMAGE is 64x0 pixels"),
                                            ((0, 64, 64, 3), "for input 'IMAGE'")],  # refused by Triton's core
                         ids=["no_rows", "empty_batch"])
def test_an_image_without_pixels_is_the_callers_error(client, shape, message):
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [image_input(np.zeros(shape, np.uint8))])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in error.value.message()
    assert client.is_server_ready()


def _load_failure(model_repository, tmp_path, failing: str, inputs: dict[str, str] | None = None,
                  merges: tuple[str, ...] = (), outputs: dict[str, str] | None = None,
                  removes: tuple[str, ...] = ()) -> str:
    """Triton's report when the repository, with each model's `inputs` and `outputs` replaced, `merges` merged and
    the files `removes` names (relative to the repository) deleted, is started; it must say `failing` failed."""
    from benchmarks.config_variant import make_variant
    from ensemble.triton.launcher import TritonServer, TritonStartError

    tensors = {**{(model, "input"): text for model, text in (inputs or {}).items()},
               **{(model, "output"): text for model, text in (outputs or {}).items()}}
    variant = make_variant(tmp_path / "variant", source=model_repository,
                           clears=[f"{model}:{field}" for model, field in tensors],
                           merges=[f"{model}:{field} [ {text} ]" for (model, field), text in tensors.items()]
                           + list(merges))
    for relative in removes:
        (variant / relative).unlink()  # a link into model_repository/: the original stays
    with pytest.raises(TritonStartError) as error:
        TritonServer(variant, ready_timeout=60, log_file=tmp_path / "tritonserver.log").start()
    report = str(error.value)
    assert f"model '{failing}' failed to load" in report
    return report


def test_postprocess_refuses_to_load_priors_that_do_not_match_its_loc_input(model_repository, tmp_path):
    report = _load_failure(model_repository, tmp_path, "postprocess", {"postprocess": (
        '{ name: "LOC", data_type: TYPE_FP32, dims: [ 8000, 4 ] }, '
        '{ name: "CONF", data_type: TYPE_FP32, dims: [ 8000, 2 ] }, '
        '{ name: "IMAGE", data_type: TYPE_UINT8, dims: [ -1, -1, 3 ] }')})
    assert "LOC has 8000 rows in config.pbtxt but 1/priors.npy holds 8892 priors" in report


def test_postprocess_refuses_to_load_a_classifier_whose_input_disagrees_with_the_crops(model_repository, tmp_path):
    report = _load_failure(model_repository, tmp_path, "postprocess", {
        "mask_classifier": '{ name: "input", data_type: TYPE_FP32, dims: [ 160, 160, 3 ] }'})
    assert "declares inputs [('input', 'TYPE_FP32', (160, 160, 3))]" in report


def test_postprocess_refuses_to_send_the_classifier_larger_batches_than_it_takes(model_repository, tmp_path):
    report = _load_failure(model_repository, tmp_path, "postprocess", merges=(
        'postprocess:parameters { key: "classifier_batch_size" value { string_value: "32" } }',))
    assert "classifier_batch_size is 32 but mask_classifier's max_batch_size is 16" in report


def test_postprocess_refuses_to_load_without_its_priors_file_and_says_what_writes_it(model_repository, tmp_path):
    """A repository whose models were never built: the load says which command makes the missing file."""
    report = _load_failure(model_repository, tmp_path, "postprocess", removes=("postprocess/1/priors.npy",))
    assert "postprocess/1/priors.npy is missing: `python -m ensemble.build` (make models) writes it" in report


def test_postprocess_refuses_to_load_a_classifier_batch_size_below_one(model_repository, tmp_path):
    """Zero faces per BLS call would never classify a face: found at load, not by the first request with one."""
    report = _load_failure(model_repository, tmp_path, "postprocess", merges=(
        'postprocess:parameters { key: "classifier_batch_size" value { string_value: "0" } }',))
    assert "classifier_batch_size must be >= 1, got 0" in report


def test_preprocess_refuses_to_load_a_blob_shape_the_layouts_do_not_make(model_repository, tmp_path):
    """Blobs of another size than config.pbtxt declares would fail every request at run time."""
    report = _load_failure(model_repository, tmp_path, "preprocess", outputs={
        "preprocess": '{ name: "BLOB", data_type: TYPE_FP32, dims: [ 3, 320, 320 ] }'})
    assert ("config.pbtxt declares BLOB dims (3, 320, 320), but ensemble/layouts.py makes the detector input "
            "(3, 300, 300)") in report


def test_postprocess_serves_from_a_folder_of_its_own(model_repository, reference_pipeline, tmp_path):
    """Triton copies each model of a repository in cloud storage (S3, GCS) to a folder of its own: postprocess, in a
    second --model-repository with nothing beside it, must load and answer, only warning that it could not check
    the classifier's config."""
    import shutil

    from benchmarks.config_variant import make_variant
    from ensemble.triton.launcher import TritonServer

    main = make_variant(tmp_path / "main", source=model_repository)  # an unedited mirror
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.move(main / "postprocess", alone / "postprocess")
    log = tmp_path / "tritonserver.log"
    with TritonServer(main, ready_timeout=120, log_file=log, extra_args=[f"--model-repository={alone}"]) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as own_client:
            (found,) = detect(own_client, [IMAGES["astronaut"]])
    assert_same(found, reference_pipeline.detect(IMAGES["astronaut"]))
    assert "config.pbtxt is not readable from here" in log.read_text()


def test_without_the_classifier_loaded_faces_fail_as_model_not_ready(model_repository, tmp_path):
    """What `--model-control-mode=explicit --load-model=mask_detection` alone gives (Triton cannot see a BLS call's
    target): the ensemble loads, an image without a face is answered, one with a face fails, and the gateway maps
    that failure to 503 model_not_ready, not to a gateway fault."""
    import shutil

    from benchmarks.config_variant import make_variant
    from ensemble.triton.launcher import TritonServer
    from gateway.errors import ModelNotReady
    from gateway.settings import Settings
    from gateway.triton_client import translate_error

    variant = make_variant(tmp_path / "variant", source=model_repository)
    shutil.rmtree(variant / "mask_classifier")
    with TritonServer(variant, ready_timeout=120, log_file=tmp_path / "tritonserver.log") as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as own_client:
            (nothing,) = detect(own_client, [NO_FACE])
            assert nothing.labels.size == 0
            with pytest.raises(InferenceServerException) as error:
                own_client.infer(MODEL, [image_input(IMAGES["astronaut"][None])])
    assert "Model 'mask_classifier' is not ready" in error.value.message()
    assert isinstance(translate_error(error.value, Settings()), ModelNotReady)


def test_postprocess_refuses_to_load_labels_the_classifier_does_not_score(model_repository, tmp_path):
    """Three labels for a two-way classifier would fail only requests that have faces, and only at run time."""
    report = _load_failure(model_repository, tmp_path, "postprocess", merges=(
        'postprocess:parameters { key: "labels" value { string_value: "mask, no_mask, unsure" } }',))
    assert "outputs [('probabilities', 'TYPE_FP32', (2,))]" in report
    assert "one probability per label of mask,no_mask,unsure" in report  # the labels' spaces are not part of them
