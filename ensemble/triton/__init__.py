"""Serving the models with Triton: config files, Python-backend helpers, repository staging, server launcher."""
