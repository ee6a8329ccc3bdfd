# Triton 2.51 (NGC release 24.10) with the project's `ensemble` package, which the Python models
# (preprocess, postprocess) import. Build context: the repository root (see docker-compose.yml).
# The model repository is not baked in: compose mounts ../model_repository read-only at /models.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/facemask
COPY setup.cfg pyproject.toml README.md ./
COPY ensemble ./ensemble
# --no-deps: the Python models need only the packages below, and the tritonclient pin must match the
# server (for its model_config protobuf), which the package's own looser requirement would not keep. CuPy (for the image's CUDA 12):
# postprocess keeps the detector's heads on the GPU (FORCE_CPU_ONLY_INPUT_TENSORS "no") and decodes them
# there through DLPack; without it every request whose heads arrive in GPU memory would fail.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -m pip install --no-cache-dir \
        "numpy>=1.24,<2" \
        "opencv-python-headless>=4.10,<5" \
        "array-api-compat>=1.9" \
        "cupy-cuda12x>=13,<14" \
        "tritonclient[grpc]==2.51.0" \
 && python3 -c "import cupy, ensemble.postprocess, ensemble.preprocess, ensemble.triton.config"

# trt_engine_cache_path in the model configs is /tmp/trt_cache/<model>: ONNX Runtime creates the last folder
# only, so the parent must exist even where no volume is mounted there (a plain `docker run`).
RUN mkdir -p /tmp/trt_cache

EXPOSE 8000 8001 8002
