"""Summarise the gateway's JSON-lines access log: volume, success rate, latency, error codes, busy hours.

    python -m gateway.log_analysis access.log [--json] [--top N]
    python -m gateway.log_analysis - < access.log          # stdin; FILE may also be gzip (.gz)

One JSON object per request, with the keys
    ts (ISO 8601, UTC), request_id, trace_id, span_id, route, method, status, duration_ms,
    image_width, image_height, faces, error_code
of which `ts`, `status` and `duration_ms` are required; the others may be null or missing. A line that
is not such an object (not JSON, not an object, a required key missing or of the wrong type, a negative
duration, an unreadable timestamp) is skipped and counted as malformed; blank lines are ignored.

Definitions:
- success: status below 400 (a 4xx is the client's failure, a 5xx the service's; both are reported);
- latency percentiles: nearest rank, the smallest duration with at least p% of requests at or below it
  (numpy's method="inverted_cdf"); no interpolation, so every value reported was actually observed;
- busiest hours: requests per UTC clock hour ("2024-05-01T13:00Z" holds 13:00:00-13:59:59), most first,
  ties broken by the earlier hour;
- top error codes: the `error_code` values by count, ties broken alphabetically.

Exit status: 0 when the file was read (even with malformed lines), 2 when it could not be opened.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import sys
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence, TextIO

REQUIRED_KEYS = ("ts", "status", "duration_ms")
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class AccessRecord:
    """One valid access-log line."""

    ts: datetime  # aware, UTC
    status: int
    duration_ms: float
    route: str | None = None
    method: str | None = None
    error_code: str | None = None
    faces: int | None = None
    trace_id: str | None = None


class MalformedLine(ValueError):
    """Why a line was skipped: `kind` is a short tag (not_json, not_object, missing_key, bad_ts, bad_status,
    bad_duration), the message the detail."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


def parse_timestamp(value: Any) -> datetime:
    """ISO 8601 -> aware UTC datetime; a timestamp without offset is taken as UTC."""
    if not isinstance(value, str) or not value:
        raise MalformedLine("bad_ts", "ts is not a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedLine("bad_ts", f"ts {value!r} is not ISO 8601") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _optional_str(entry: dict, key: str) -> str | None:
    value = entry.get(key)
    return value if isinstance(value, str) and value else None


def parse_line(line: str) -> AccessRecord:
    """One line -> AccessRecord, or MalformedLine saying why not."""
    try:
        entry = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        raise MalformedLine("not_json", "not JSON") from None
    if not isinstance(entry, dict):
        raise MalformedLine("not_object", "not a JSON object")
    missing = [key for key in REQUIRED_KEYS if entry.get(key) is None]
    if missing:
        raise MalformedLine("missing_key", f"missing {', '.join(missing)}")
    status, duration = entry["status"], entry["duration_ms"]
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise MalformedLine("bad_status", f"status {status!r} is not an HTTP status")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not math.isfinite(duration) \
            or duration < 0:
        raise MalformedLine("bad_duration", f"duration_ms {duration!r} is not a non-negative number")
    faces = entry.get("faces")
    return AccessRecord(
        ts=parse_timestamp(entry["ts"]), status=status, duration_ms=float(duration),
        route=_optional_str(entry, "route"), method=_optional_str(entry, "method"),
        error_code=_optional_str(entry, "error_code"),
        faces=faces if isinstance(faces, int) and not isinstance(faces, bool) and faces >= 0 else None,
        trace_id=_optional_str(entry, "trace_id"),
    )


def nearest_rank(sorted_values: Sequence[float], percentile: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(percentile / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Report:
    lines: int = 0  # non-blank lines read
    malformed: int = 0
    requests: int = 0
    succeeded: int = 0  # status < 400
    client_errors: int = 0  # 4xx
    server_errors: int = 0  # 5xx
    success_rate: float | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)  # mean, max, p50, p95, p99
    top_error_codes: list[tuple[str, int]] = field(default_factory=list)
    busiest_hours: list[tuple[str, int]] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)
    route_counts: dict[str, int] = field(default_factory=dict)
    faces_total: int = 0
    traced_requests: int = 0  # with a trace_id (sampled by the gateway)
    first_ts: str | None = None
    last_ts: str | None = None
    malformed_reasons: dict[str, int] = field(default_factory=dict)  # MalformedLine.kind -> lines

    def to_dict(self) -> dict:
        data = asdict(self)
        data["top_error_codes"] = [{"code": code, "count": count} for code, count in self.top_error_codes]
        data["busiest_hours"] = [{"hour": hour, "count": count} for hour, count in self.busiest_hours]
        return data


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def analyze(lines: Iterable[str], *, top: int = 5) -> Report:
    """Read every line once; memory grows only with the number of requests (one float each)."""
    report = Report()
    durations = array("d")
    errors: Counter[str] = Counter()
    hours: Counter[datetime] = Counter()
    statuses: Counter[int] = Counter()
    routes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    first = last = None
    for line in lines:
        if not line.strip():
            continue
        report.lines += 1
        try:
            record = parse_line(line)
        except MalformedLine as exc:
            report.malformed += 1
            reasons[exc.kind] += 1
            continue
        report.requests += 1
        durations.append(record.duration_ms)
        statuses[record.status] += 1
        if record.status < 400:
            report.succeeded += 1
        elif record.status < 500:
            report.client_errors += 1
        else:
            report.server_errors += 1
        if record.error_code:
            errors[record.error_code] += 1
        routes[record.route or "-"] += 1
        hours[record.ts.replace(minute=0, second=0, microsecond=0)] += 1
        report.faces_total += record.faces or 0
        report.traced_requests += record.trace_id is not None
        first = record.ts if first is None or record.ts < first else first
        last = record.ts if last is None or record.ts > last else last

    ordered = sorted(durations)
    report.latency_ms = {"mean": (math.fsum(ordered) / len(ordered)) if ordered else None,
                         "max": ordered[-1] if ordered else None}
    report.latency_ms.update({f"p{p}": nearest_rank(ordered, p) for p in PERCENTILES})
    report.success_rate = report.succeeded / report.requests if report.requests else None
    report.top_error_codes = sorted(errors.items(), key=lambda item: (-item[1], item[0]))[:top]
    report.busiest_hours = [(hour.strftime("%Y-%m-%dT%H:00Z"), count)
                            for hour, count in sorted(hours.items(), key=lambda item: (-item[1], item[0]))[:top]]
    report.status_counts = {str(status): count for status, count in sorted(statuses.items())}
    report.route_counts = dict(sorted(routes.items(), key=lambda item: (-item[1], item[0])))
    report.malformed_reasons = dict(reasons.most_common())
    report.first_ts = _iso(first) if first else None
    report.last_ts = _iso(last) if last else None
    return report


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_text(report: Report) -> str:
    """The report for a person."""
    rate = "-" if report.success_rate is None else f"{report.success_rate:.2%}"
    out = [
        f"requests        {report.requests}  ({report.malformed} malformed line(s) skipped of {report.lines})",
        f"period          {report.first_ts or '-'} .. {report.last_ts or '-'}",
        f"success rate    {rate}  (2xx/3xx {report.succeeded}, 4xx {report.client_errors}, "
        f"5xx {report.server_errors})",
        f"latency         mean {_ms(report.latency_ms.get('mean'))}, p50 {_ms(report.latency_ms.get('p50'))}, "
        f"p95 {_ms(report.latency_ms.get('p95'))}, p99 {_ms(report.latency_ms.get('p99'))}, "
        f"max {_ms(report.latency_ms.get('max'))}",
        f"faces           {report.faces_total} in total; {report.traced_requests} request(s) traced",
        "top error codes " + (", ".join(f"{code} ({count})" for code, count in report.top_error_codes) or "none"),
        "busiest hours   " + (", ".join(f"{hour} ({count})" for hour, count in report.busiest_hours) or "none"),
        "routes          " + (", ".join(f"{route} ({count})" for route, count in report.route_counts.items())
                              or "none"),
    ]
    if report.malformed_reasons:
        reasons = ", ".join(f"{why} ({count})" for why, count in report.malformed_reasons.items())
        out.append(f"malformed       {reasons}")
    return "\n".join(out)


def open_log(path: str) -> TextIO:
    """A text stream over FILE ("-" is stdin; *.gz is decompressed); undecodable bytes become U+FFFD."""
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.log_analysis",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", metavar="FILE", help='JSON-lines access log ("-" for stdin, .gz accepted)')
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--top", type=int, default=5, help="how many error codes and hours to list (default 5)")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    try:
        with open_log(args.file) as stream:
            report = analyze(stream, top=args.top)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_text(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
