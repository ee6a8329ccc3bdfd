"""Numerical core of the face-mask detection service: export, pre/postprocessing, reference pipeline."""
