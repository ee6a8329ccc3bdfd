"""Exporters from the registry-shipped weights to ONNX, without a Caffe or TensorFlow runtime."""
