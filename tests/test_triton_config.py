"""config.pbtxt read and written through Triton's protobuf schema."""
from pathlib import Path

import pytest
from google.protobuf import text_format

from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.config import (format_config, is_onnxruntime, load_config, ort_session_entries, parse_config,
                                    save_config, string_parameters)

CANONICAL_MODELS = sorted(path.parent.name for path in DEFAULT_REPOSITORY.glob("*/config.pbtxt"))


@pytest.mark.parametrize("model", CANONICAL_MODELS)
def test_round_trip_keeps_every_field(model, tmp_path):
    config = load_config(DEFAULT_REPOSITORY / model)
    save_config(config, tmp_path / "config.pbtxt")
    assert load_config(tmp_path) == config
    assert parse_config(format_config(config)) == config


def test_parameters_read_as_strings():
    parameters = string_parameters(load_config(DEFAULT_REPOSITORY / "postprocess"))
    assert parameters["priors_file"] == "1/priors.npy"
    assert parameters["labels"] == "mask,no_mask"
    assert float(parameters["confidence"]) == pytest.approx(0.5)


def test_onnxruntime_models_recognised_by_backend_or_platform():
    assert is_onnxruntime(load_config(DEFAULT_REPOSITORY / "face_detector"))
    assert is_onnxruntime(parse_config('name: "m" platform: "onnxruntime_onnx"'))
    assert not is_onnxruntime(load_config(DEFAULT_REPOSITORY / "postprocess"))
    assert not is_onnxruntime(load_config(DEFAULT_REPOSITORY / "mask_detection"))


def test_unknown_field_is_an_error_as_in_triton():
    with pytest.raises(text_format.ParseError):
        parse_config('name: "m" backend: "python" max_batch: 4')


def test_save_into_model_directory(tmp_path: Path):
    save_config(parse_config('name: "m" backend: "python"'), tmp_path)
    assert load_config(tmp_path / "config.pbtxt").name == "m"


def test_only_onnxruntime_session_keys_become_session_entries():
    parameters = {"session.intra_op.allow_spinning": "0", "intra_op_thread_count": "2", "sessionless": "x"}
    assert ort_session_entries(parameters) == {"session.intra_op.allow_spinning": "0"}


def test_one_gateway_with_its_default_settings_cannot_fill_the_detectors_queue():
    """The queue bound's premise (face_detector's config.pbtxt): one gateway's images in flight at most, workers x
    threads x a batch request's images at once, all fit, so 429s mean several callers together outrun Triton."""
    from gateway.settings import Settings

    queue = load_config(DEFAULT_REPOSITORY / "face_detector").dynamic_batching.default_queue_policy.max_queue_size
    defaults = Settings()
    assert 0 < defaults.workers * defaults.threads * defaults.batch_concurrency <= queue
