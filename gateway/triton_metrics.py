"""Triton's own metrics (its metrics port, Prometheus text format), fetched during a scrape of the gateway and
appended to the gateway's exposition, so that one scrape target carries both.

Triton's families are kept as Triton wrote them (names, labels, values), not re-parsed into prometheus_client
objects: its parser renames a counter without the `_total` suffix (Triton's `nv_inference_count`) to
`nv_inference_count_total`, which would break every query on it. In the OpenMetrics format such counters are
declared `unknown` (an OpenMetrics counter's samples must end in `_total`); the series are unchanged.
A family whose name the gateway already exposes is dropped, so every family has one HELP and one TYPE.
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterable

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# Sample-name suffixes that belong to a family of that type (text format 0.0.4 and OpenMetrics).
FAMILY_SUFFIXES = {"counter": ("_total", "_created"), "summary": ("_count", "_sum", "_created"),
                   "histogram": ("_bucket", "_count", "_sum", "_created"),
                   "gaugehistogram": ("_bucket", "_gcount", "_gsum")}
OPENMETRICS_TYPES = {"untyped": "unknown"}
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass
class Family:
    """One metric family as Triton wrote it: HELP (text-format escaped), TYPE, and its sample lines."""

    name: str
    type: str = "untyped"
    help: str | None = None
    samples: list[str] = field(default_factory=list)
    sample_names: set[str] = field(default_factory=set)

    def owns(self, sample_name: str) -> bool:
        if sample_name == self.name:
            return True
        return any(sample_name == self.name + suffix for suffix in FAMILY_SUFFIXES.get(self.type, ()))

    def names(self) -> set[str]:
        return {self.name} | self.sample_names


@dataclass(frozen=True)
class TritonScrape:
    ok: bool
    families: list[Family]
    error: str = ""


def fetch(url: str, timeout_s: float) -> TritonScrape:
    """GET Triton's metrics page; any failure (down, slow, not 200, not text) is an unsuccessful scrape."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read(MAX_BODY_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        return TritonScrape(False, [], f"{type(error).__name__}: {getattr(error, 'reason', error)}")
    if len(body) > MAX_BODY_BYTES:
        return TritonScrape(False, [], f"more than {MAX_BODY_BYTES} bytes")
    try:
        return TritonScrape(True, parse(body.decode("utf-8")))
    except (UnicodeDecodeError, ValueError) as error:
        return TritonScrape(False, [], f"unreadable: {error}")


def parse(text: str) -> list[Family]:
    """Group a text-format exposition into families, in order; samples keep their exact text."""
    families: dict[str, Family] = {}
    current: Family | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = families.setdefault(parts[2], Family(parts[2]))
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    current.help = rest
                else:
                    current.type = rest.strip().lower() or "untyped"
            continue  # other comments are dropped
        match = METRIC_NAME.match(line)
        if match is None:
            raise ValueError(f"not a sample line: {line[:80]!r}")
        name = match.group()
        if current is None or not current.owns(name):
            current = families.setdefault(name, Family(name))
        current.samples.append(line)
        current.sample_names.add(name)
    return list(families.values())


def without_names(families: Iterable[Family], taken: set[str]) -> list[Family]:
    """Families none of whose names (family or sample) is already taken: no family is exposed twice."""
    kept = []
    for family in families:
        if family.names() & taken:
            continue
        kept.append(family)
        taken = taken | family.names()
    return kept


def render_text(families: Iterable[Family]) -> str:
    """Prometheus text format 0.0.4, as Triton wrote it."""
    out = []
    for family in families:
        if family.help is not None:
            out.append(f"# HELP {family.name} {family.help}")
        out.append(f"# TYPE {family.name} {family.type}")
        out.extend(family.samples)
    return "\n".join(out) + "\n" if out else ""


def _openmetrics_help(text_help: str) -> str:
    """Text-format HELP escapes backslash and newline; OpenMetrics also escapes the double quote."""
    unescaped = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text_help)
    return unescaped.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


_SPECIAL_VALUES = {"nan": "NaN", "+inf": "+Inf", "inf": "+Inf", "-inf": "-Inf"}


def _openmetrics_sample(line: str) -> str:
    """A text-format sample line in OpenMetrics form: canonical NaN/Inf spelling, timestamp in seconds."""
    end = line.rfind("}")
    head, tail = (line[:end + 1], line[end + 1:]) if end >= 0 else (METRIC_NAME.match(line).group(),
                                                                      line[METRIC_NAME.match(line).end():])
    tokens = tail.split()
    if not tokens:
        raise ValueError(f"sample without a value: {line[:80]!r}")
    tokens[0] = _SPECIAL_VALUES.get(tokens[0].lower(), tokens[0])
    if len(tokens) > 1:  # text-format timestamps are milliseconds, OpenMetrics ones seconds
        tokens[1] = repr(int(tokens[1]) / 1000)
    return f"{head} {' '.join(tokens[:2])}"


def render_openmetrics(families: Iterable[Family]) -> str:
    """OpenMetrics 1.0 lines (without the closing `# EOF`)."""
    out = []
    for family in families:
        kind = OPENMETRICS_TYPES.get(family.type, family.type)
        if kind == "counter" and not all(name.endswith(("_total", "_created")) for name in family.sample_names):
            kind = "unknown"  # Triton's counters lack `_total`; keep the series names, drop the type claim
        name = family.name[:-len("_total")] if kind == "counter" and family.name.endswith("_total") else family.name
        if family.help is not None:
            out.append(f"# HELP {name} {_openmetrics_help(family.help)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_openmetrics_sample(line) for line in family.samples)
    return "\n".join(out) + "\n" if out else ""
