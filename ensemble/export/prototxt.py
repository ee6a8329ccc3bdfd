"""A small reader for protobuf text format (Caffe's .prototxt), so exporting needs no caffe.proto.

A message becomes a dict mapping each field name to the list of its values, in file order: a list
even for fields seen once, because text format cannot tell a repeated field from a single one.
Values are int, float, bool, str (quoted strings and enum names) or nested messages (dicts).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ensemble.export.onnx_io import ExportError

Message = dict[str, list[Any]]

# A quoted string, a delimiter, a comment (dropped) or a bare word (name, number, enum).
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|[{}:]|#[^\n]*|[^\s{}:"\'#]+')


def _tokens(text: str) -> list[str]:
    """Split text into tokens, refusing characters the grammar below does not know."""
    tokens, position = [], 0
    for match in _TOKEN.finditer(text):
        gap = text[position:match.start()]
        if gap.strip():
            raise ValueError(f"unexpected {gap.strip()[:20]!r} at offset {position}")
        position = match.end()
        if not match.group().startswith("#"):
            tokens.append(match.group())
    if text[position:].strip():
        raise ValueError(f"unexpected {text[position:].strip()[:20]!r} at offset {position}")
    return tokens


def _scalar(token: str) -> Any:
    """Turn a value token into the Python value it spells."""
    if token[0] in "\"'":
        return ast.literal_eval(token)
    for convert in (int, float):
        try:
            return convert(token)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(token.lower(), token)


def _message(tokens: list[str], index: int, nested: bool) -> tuple[Message, int]:
    """Parse fields from tokens[index] up to a closing brace (nested) or the end; return the next index."""
    message: Message = {}
    while index < len(tokens):
        name = tokens[index]
        if name == "}":
            if nested:
                return message, index + 1
            raise ValueError("unbalanced '}'")
        if name in ("{", ":") or index + 1 >= len(tokens):
            raise ValueError(f"expected 'field: value' or 'field {{', got {name!r}")
        index += 1
        if tokens[index] == ":":
            index += 1
        if index < len(tokens) and tokens[index] == "{":
            value, index = _message(tokens, index + 1, nested=True)
        elif index < len(tokens) and tokens[index] not in ("{", "}", ":"):
            value, index = _scalar(tokens[index]), index + 1
        else:
            raise ValueError(f"field {name!r} has no value")
        message.setdefault(name, []).append(value)
    if nested:
        raise ValueError("missing '}' at end of text")
    return message, index


def parse_prototxt(text: str) -> Message:
    """Parse protobuf text format into nested dicts of lists; raise ValueError on malformed text."""
    message, _ = _message(_tokens(text), 0, nested=False)
    return message


def load_prototxt(path: Path) -> Message:
    """Read and parse a prototxt, reporting any problem as an ExportError that names the file."""
    try:
        return parse_prototxt(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError, SyntaxError) as exc:
        raise ExportError(f"{path}: cannot parse prototxt: {exc}") from exc


def first(message: Message, field: str, default: Any = None) -> Any:
    """The field's single value (text format has no scalar/list distinction), or `default`."""
    values = message.get(field)
    return values[0] if values else default
