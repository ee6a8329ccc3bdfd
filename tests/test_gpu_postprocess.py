"""The GPU path of postprocess (CuPy arrays, as DLPack hands them over) equals the NumPy path.

Runs where CuPy and a CUDA device exist (the GPU device machine); skips cleanly elsewhere.
"""
import numpy as np
import pytest

from ensemble.postprocess import detect_faces
from ensemble.ssd import to_host

cupy = pytest.importorskip("cupy")
pytestmark = pytest.mark.gpu
if not cupy.is_available():  # pragma: no cover - depends on the machine (getDeviceCount raises without a driver)
    pytest.skip("no CUDA device", allow_module_level=True)


def test_gpu_decode_and_nms_equal_the_numpy_path(reference_pipeline, real_images):
    params = reference_pipeline.params.override({"confidence": 0.05})
    for name, image in real_images.items():
        (loc,), (conf,) = reference_pipeline.raw_heads([image])
        cpu_boxes, cpu_scores = detect_faces(loc, conf, reference_pipeline.priors, image.shape[:2], params)
        gpu_boxes, gpu_scores = detect_faces(cupy.asarray(loc), cupy.asarray(conf),
                                             reference_pipeline.priors.on(cupy), image.shape[:2], params)
        np.testing.assert_allclose(to_host(gpu_boxes), cpu_boxes, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(to_host(gpu_scores), cpu_scores, atol=1e-5, err_msg=name)
        assert isinstance(gpu_boxes, cupy.ndarray)
