"""The canonical repository's configs agree with each other and with ensemble/layouts.py."""
import pytest
from tritonclient.grpc.model_config_pb2 import DataType

from ensemble import layouts
from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.config import load_config, string_parameters

CONFIGS = {path.parent.name: load_config(path) for path in DEFAULT_REPOSITORY.glob("*/config.pbtxt")}
ENSEMBLE = CONFIGS["mask_detection"]


def tensors(config, kind):
    return {tensor.name: (tensor.data_type, list(tensor.dims)) for tensor in getattr(config, kind)}


def test_directory_names_are_model_names():
    assert {name: config.name for name, config in CONFIGS.items()} == {name: name for name in CONFIGS}


def test_ensemble_steps_connect_with_matching_types_and_dims():
    """Every step input is an ensemble input or an earlier step's output of the same type and shape."""
    available = tensors(ENSEMBLE, "input")
    for step in ENSEMBLE.ensemble_scheduling.step:
        model = CONFIGS[step.model_name]
        inputs, outputs = tensors(model, "input"), tensors(model, "output")
        assert set(step.input_map) == set(inputs), step.model_name
        for model_input, ensemble_tensor in step.input_map.items():
            assert available[ensemble_tensor] == inputs[model_input], (step.model_name, model_input)
        for model_output, ensemble_tensor in step.output_map.items():
            available[ensemble_tensor] = outputs[model_output]
    for name, spec in tensors(ENSEMBLE, "output").items():
        assert available[name] == spec, name


def test_every_step_takes_the_ensemble_batch():
    for step in ENSEMBLE.ensemble_scheduling.step:
        assert CONFIGS[step.model_name].max_batch_size >= ENSEMBLE.max_batch_size, step.model_name


@pytest.mark.parametrize(("model", "layout"), [("face_detector", layouts.DETECTOR_INPUT),
                                               ("mask_classifier", layouts.CLASSIFIER_INPUT)])
def test_model_inputs_follow_layouts(model, layout):
    assert tensors(CONFIGS[model], "input") == {layout.tensor: (DataType.TYPE_FP32, list(layout.dims))}


def test_detector_outputs_and_preprocess_blob_follow_layouts():
    assert list(tensors(CONFIGS["face_detector"], "output")) == list(layouts.DETECTOR_OUTPUTS)
    assert tensors(CONFIGS["preprocess"], "output")["BLOB"][1] == list(layouts.DETECTOR_INPUT.dims)


def test_postprocess_parameters_name_the_classifier_its_labels_and_priors():
    parameters = string_parameters(CONFIGS["postprocess"])
    classifier = CONFIGS[parameters["classifier_model"]]
    assert [output.name for output in classifier.output] == [layouts.CLASSIFIER_OUTPUT]
    assert tuple(parameters["labels"].split(",")) == layouts.CLASSIFIER_LABELS
    labels_file = DEFAULT_REPOSITORY / classifier.name / classifier.output[0].label_filename
    assert tuple(labels_file.read_text().split()) == layouts.CLASSIFIER_LABELS
    assert int(parameters["classifier_batch_size"]) == classifier.max_batch_size  # as few BLS calls as it allows


def test_postprocess_reads_its_priors_from_its_own_folder_where_the_build_copies_them():
    """A copy made by the build (ensemble.build.COPIES; its contents are checked in test_build), so that postprocess
    loads where Triton copies each model to a folder of its own (cloud storage)."""
    from ensemble.build import COPIES

    priors = (DEFAULT_REPOSITORY / "postprocess" / string_parameters(CONFIGS["postprocess"])["priors_file"]).resolve()
    assert priors.is_relative_to((DEFAULT_REPOSITORY / "postprocess").resolve())
    assert ("face_detector/1/priors.npy", "postprocess/1/priors.npy") in COPIES
    assert priors == (DEFAULT_REPOSITORY / "postprocess/1/priors.npy").resolve()


def test_the_gateway_never_forwards_a_max_faces_postprocess_refuses():
    """The gateway's own bound on max_faces is postprocess's max_faces_limit: a 422 from the gateway, not a Triton
    INVALID_ARG, for anything larger."""
    from gateway.params import MAX_FACES_LIMIT

    assert int(string_parameters(CONFIGS["postprocess"])["max_faces_limit"]) == MAX_FACES_LIMIT


def test_the_api_document_states_the_models_default_thresholds():
    """openapi.json quotes each default ("Default: the model's (0.5)"); postprocess's parameters are where they live."""
    from gateway.openapi import openapi_document

    parameters = openapi_document()["components"]["parameters"]
    configured = string_parameters(CONFIGS["postprocess"])
    for name in ("confidence", "iou", "max_faces"):
        assert f"Default: the model's ({configured[name]})" in parameters[name]["description"], name
