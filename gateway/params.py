"""Per-request detection thresholds from the query string, validated before anything reaches Triton."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

from werkzeug.datastructures import MultiDict

from gateway.errors import InvalidParameter, ParameterOutOfRange

MAX_FACES_LIMIT = 1000


@dataclass(frozen=True)
class DetectParams:
    """Overrides of the model's defaults; None leaves the model's own default in force."""

    confidence: float | None = None  # minimum face score, in (0, 1]
    iou: float | None = None  # NMS overlap threshold, in (0, 1]
    max_faces: int | None = None  # at most this many faces, >= 1

    def triton_parameters(self) -> dict[str, str | int]:
        """The request parameters Triton's postprocess model reads (only those the caller set).

        Floats travel as strings: Triton's Python backend accepts only bool, int and string parameters.
        """
        return {name: repr(value) if isinstance(value, float) else value
                for name, value in asdict(self).items() if value is not None}


# the query parameters of both detection endpoints
PARAMETER_NAMES = tuple(field.name for field in fields(DetectParams))


INTEGER = re.compile(r"\s*(?P<sign>[+-]?)(?P<digits>[0-9]+)\s*")
SHOWN_CHARACTERS = 64  # of a caller's value quoted in an error message


def _shown(raw: str) -> str:
    """The caller's value as an error message quotes it: cut short, so a huge value makes no huge answer or log."""
    return repr(raw) if len(raw) <= SHOWN_CHARACTERS else f"{raw[:SHOWN_CHARACTERS]!r}..."


def _unit_interval(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number in (0, 1], got {_shown(raw)}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ParameterOutOfRange(f"{name} must be in (0, 1], got {_shown(raw)}")
    return value


def _positive_int(name: str, raw: str, upper: int) -> int:
    """ASCII decimal digits only (int() would also take "1_0" and other scripts' digits); a number of any length
    beyond `upper` is out of range, not unreadable (int() refuses more than 4300 digits)."""
    message = f"{name} must be an integer in [1, {upper}], got {_shown(raw)}"
    match = INTEGER.fullmatch(raw)
    if match is None:
        raise InvalidParameter(message)
    digits = match["digits"].lstrip("0") or "0"
    if len(digits) > len(str(upper)) or not 1 <= int(match["sign"] + digits) <= upper:
        raise ParameterOutOfRange(message)
    return int(digits)


def parse_detect_params(args: MultiDict) -> DetectParams:
    """Parse `confidence`, `iou` and `max_faces`; 400 when not a number, 422 when out of range.

    Any other name, or one of these given twice, is a 400 too: a misspelt threshold would otherwise be
    answered with the model's defaults as if it had been applied.
    """
    for name, values in args.lists():
        if name not in PARAMETER_NAMES:
            raise InvalidParameter(f"unknown parameter {name[:64]!r}; the parameters are {', '.join(PARAMETER_NAMES)}")
        if len(values) > 1:
            raise InvalidParameter(f"{name} is given {len(values)} times; give it once")
    confidence = args.get("confidence")
    iou = args.get("iou")
    max_faces = args.get("max_faces")
    return DetectParams(
        confidence=None if confidence is None else _unit_interval("confidence", confidence),
        iou=None if iou is None else _unit_interval("iou", iou),
        max_faces=None if max_faces is None else _positive_int("max_faces", max_faces, MAX_FACES_LIMIT),
    )
