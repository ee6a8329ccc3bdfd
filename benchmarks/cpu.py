"""CPU time of a server's whole process tree, from /proc: a per-request cost that a busy machine distorts less
than throughput does.

tritonserver (with its Python-backend stubs) and gunicorn (with its workers) each run in their own
session (both are started with start_new_session), so "every process of session S" is the server.
On a machine shared with other work, throughput falls with the share of the cores the server gets,
while CPU milliseconds per request mostly do not; both are recorded.
"""
from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat_fields(pid: str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # fields from `state` on: the command may contain spaces


def _session_stats(session: int):
    """(pid, stat fields from `state` on) of every live process in `session`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        # state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        if fields and len(fields) > 12 and int(fields[3]) == session:
            yield int(entry), fields


def session_pids(session: int) -> list[int]:
    return [pid for pid, _ in _session_stats(session)]


def session_cpu_seconds(session: int) -> float | None:
    """User + system seconds of every live process in `session` (None where /proc is unavailable)."""
    if not Path("/proc/self/stat").is_file():
        return None
    return sum(int(fields[11]) + int(fields[12]) for _, fields in _session_stats(session)) / CLOCK_TICKS


def session_of(pid: int) -> int | None:
    fields = _stat_fields(str(pid))
    return int(fields[3]) if fields else None


def find_session(argument: str) -> int | None:
    """The session of the first process whose command line contains `argument` (e.g. "--grpc-port=8001")."""
    needle = argument.encode() + b"\0"  # the whole argument: port 800 must not match --grpc-port=8001
    for entry in os.listdir("/proc") if Path("/proc").is_dir() else []:
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            return session_of(int(entry))
    return None


def triton_session(grpc_url: str) -> int | None:
    """The session of the tritonserver listening on `grpc_url` (host:port), found by its --grpc-port flag."""
    return find_session(f"--grpc-port={grpc_url.rsplit(':', 1)[-1]}")


class CpuMeter:
    """CPU seconds used by a session between start() and stop(); None throughout when it cannot be read."""

    def __init__(self, session: int | None):
        self.session = session
        self._start: float | None = None

    def start(self) -> None:
        self._start = session_cpu_seconds(self.session) if self.session else None

    def stop(self) -> float | None:
        if self._start is None:
            return None
        end = session_cpu_seconds(self.session)
        return None if end is None else round(end - self._start, 3)
