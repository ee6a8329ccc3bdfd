#!/usr/bin/env bash
# Optional check that the h5py-only ONNX export matches the original Keras model, run in a
# throwaway TensorFlow venv so the project venv never gets TensorFlow or a different numpy.
# Usage: tools/tf_parity.sh [extra pytest args]   (the venv is kept in /tmp and reused)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TF_PARITY_VENV:-/tmp/facemask-tf-parity-venv}"

test -x "$VENV/bin/python" || python3 -m venv "$VENV"
# tensorflow 2.15: the last release whose tf.keras (Keras 2) loads Keras 2.2.4 HDF5 models.
# numpy<2 and opencv 4.11: what the project pins and TensorFlow 2.15 accepts.
# onnx<1.19: 1.19 needs ml_dtypes>=0.5, TensorFlow 2.15 pins ml_dtypes~=0.3.
# A no-op when the venv already holds this set.
"$VENV/bin/pip" install -q 'tensorflow==2.15.*' 'numpy<2' 'opencv-python-headless==4.11.*' \
  'onnx>=1.16,<1.19' onnxruntime h5py pytest matplotlib scikit-image

cd "$REPO"
# The repo goes on PYTHONPATH instead of `pip install -e`, which would pull the project's other deps;
# --noconftest keeps other suites' fixtures (Triton, gateway) out of this venv.
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest \
  -p no:cacheprovider --noconftest -m tensorflow -s -q tests/test_mask_classifier_tf_parity.py "$@"
