"""Optional: the h5py-only ONNX export against the original Keras model itself (run tools/tf_parity.sh)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tensorflow
tf = pytest.importorskip("tensorflow")

from ensemble.export.mask_classifier import export_mask_classifier  # noqa: E402
from ensemble.layouts import CLASSIFIER_INPUT, CLASSIFIER_OUTPUT  # noqa: E402
from ensemble.weights import fetch_weights  # noqa: E402
from test_mask_classifier_export import random_inputs, sample_faces, tapped_session_for  # noqa: E402

TOLERANCE = 1e-4
# Besides the probabilities, the 128 ReLU features of the hidden Dense layer: unlike a softmax that
# saturates on clear faces, they would show any drift in the convolutional trunk.
FEATURES_LAYER = "dense"


def test_onnx_matches_keras_on_faces_and_random_inputs(tmp_path_factory):
    weights = fetch_weights()
    onnx_path = Path(export_mask_classifier(weights.keras_h5, tmp_path_factory.mktemp("onnx"))["onnx"])
    keras_model = tf.keras.models.load_model(str(weights.keras_h5), compile=False)
    features = keras_model.get_layer(FEATURES_LAYER).output
    keras_outputs = tf.keras.Model(keras_model.input, [keras_model.output, features])
    batch = np.concatenate([np.stack(list(sample_faces(weights).values())), random_inputs(6)])

    expected = keras_outputs.predict(batch, batch_size=len(batch), verbose=0)
    actual = tapped_session_for(onnx_path, FEATURES_LAYER).run(
        [CLASSIFIER_OUTPUT, FEATURES_LAYER], {CLASSIFIER_INPUT.tensor: batch})
    differences = {name: float(np.abs(a - e).max())
                   for name, a, e in zip((CLASSIFIER_OUTPUT, FEATURES_LAYER), actual, expected)}
    print(f"\nTensorFlow {tf.__version__}, {len(batch)} inputs, max abs diff ONNX vs Keras: "
          + ", ".join(f"{name} {diff:.3e}" for name, diff in differences.items()))
    assert max(differences.values()) <= TOLERANCE
