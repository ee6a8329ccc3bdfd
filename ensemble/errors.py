"""The one error that is the caller's fault inside a Triton model; everything else is the model's (INTERNAL)."""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request Triton should refuse as INVALID_ARG: a missing input, a parameter out of range.

    A ValueError, so code that validates configs with the same parsers still catches it as one; but a
    ValueError numpy raises on a bug stays INTERNAL instead of being blamed on the caller.
    """
