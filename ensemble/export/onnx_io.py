"""Checked, atomic writing of exported ONNX models."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

import numpy as np
import onnx

OPSET = 17
# Written explicitly: left to the installed onnx package it is that package's newest (14 with onnx 1.23), and the
# ONNX Runtime inside Triton 24.10's onnxruntime backend (1.19) refuses any model above IR 10. 8 is opset 17's own.
IR_VERSION = 8


class ExportError(RuntimeError):
    """An export could not produce a valid model; nothing was written."""


def write_atomically(path: Path, payload: bytes) -> None:
    """Write to a temp file beside `path`, then rename: readers never see half a file.

    The file gets the permissions a plain open() would give it (0666 less the umask), not mkstemp's 0600: a model
    repository is read by a server that need not run as the user who built it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask, as open() does
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Run onnx.checker (full check, with shape inference) and write the model atomically."""
    if model.ir_version != IR_VERSION:
        raise ExportError(f"{path}: the exported model has IR version {model.ir_version}, not {IR_VERSION}: "
                          "Triton's ONNX Runtime may refuse it")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: exported graph failed onnx.checker: {exc}") from exc
    write_atomically(path, model.SerializeToString())


def save_array(array: np.ndarray, path: Path) -> None:
    """Save a .npy atomically (np.save appends .npy to names without it, so write bytes ourselves)."""
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    write_atomically(path, buf.getvalue())
