"""OpenMetrics exemplars (a trace id on a latency bucket) that also work under gunicorn's several workers.

prometheus_client's multiprocess mode keeps only numbers in its per-process files: `observe(v, exemplar=...)`
is silently dropped there (0.26: "TODO: Implement exemplars for multiprocess mode" in values.py). So the
gateway keeps exemplars itself: each process remembers the latest (trace id, value, time) per histogram
bucket, a background thread writes them to `exemplars_<pid>.json` in PROMETHEUS_MULTIPROC_DIR at most every
FLUSH_INTERVAL_S, and the process answering a scrape attaches the newest exemplar of every bucket, across all
workers, to the merged `_bucket` samples. Only the OpenMetrics exposition carries them (the classic text
format has no exemplars), and Prometheus asks for OpenMetrics by default.

Without a multiprocess directory (one process, e.g. tests) the same store simply stays in memory.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
import threading
import time
from bisect import bisect_left
from typing import Iterable, Sequence

from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

FILE_PREFIX = "exemplars_"
FLUSH_INTERVAL_S = 0.5
EXEMPLAR_LABEL = "trace_id"

# (bucket sample name, sorted label pairs including "le")
Key = tuple[str, tuple[tuple[str, str], ...]]


def bucket_bound(value: float, upper_bounds: Sequence[float]) -> str:
    """The `le` of the bucket an observation falls in (the first upper bound >= value), as Prometheus writes it."""
    index = bisect_left(upper_bounds, value)
    return floatToGoString(upper_bounds[index] if index < len(upper_bounds) else float("inf"))


def _file_of(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{FILE_PREFIX}{pid}.json")


def remove_exemplar_files(directory: str, pid: int | None = None) -> None:
    """Delete one process's exemplar file (gunicorn child_exit), or all of them (a fresh start)."""
    paths = [_file_of(directory, pid)] if pid is not None else glob.glob(os.path.join(directory, FILE_PREFIX + "*"))
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class ExemplarStore:
    """The latest exemplar per histogram bucket of this process, shared with sibling workers through files."""

    def __init__(self, directory: str | None = None):
        self.directory = directory or None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._mine: dict[Key, tuple[str, float, float]] = {}  # key -> (trace id, value, unix time)
        self._dirty = threading.Event()
        self._flusher: threading.Thread | None = None

    def record(self, histogram: str, labels: dict[str, str], upper_bounds: Sequence[float], value: float,
               trace_id: str) -> None:
        """Remember `trace_id` as the exemplar of the bucket `value` falls in (labels without `le`)."""
        pairs = tuple(sorted({**labels, "le": bucket_bound(value, upper_bounds)}.items()))
        with self._lock:
            self._mine[(histogram + "_bucket", pairs)] = (trace_id, float(value), time.time())
            if self.directory is not None:
                self._ensure_flusher()
        if self.directory is not None:
            self._dirty.set()

    # --- sharing between processes ---
    def _ensure_flusher(self) -> None:
        """Start the writer thread once per process (a forked copy starts its own); called under the lock."""
        if self._flusher is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._flusher = threading.Thread(target=self._flush_loop, name="exemplar-flush", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(FLUSH_INTERVAL_S)  # coalesce the observations of many requests into one write
            self._dirty.clear()
            self.flush()

    def flush(self) -> None:
        """Write this process's exemplars atomically (rename), so a reader never sees half a file."""
        if self.directory is None:
            return
        with self._lock:
            entries = [[name, list(map(list, pairs)), *exemplar] for (name, pairs), exemplar in self._mine.items()]
        handle, temporary = tempfile.mkstemp(prefix=".exemplars-", dir=self.directory)
        with os.fdopen(handle, "w") as stream:
            json.dump(entries, stream, separators=(",", ":"))
        os.replace(temporary, _file_of(self.directory, os.getpid()))

    def _all(self) -> dict[Key, tuple[str, float, float]]:
        """Every process's exemplars, the newest winning per bucket; this process's from memory."""
        merged: dict[Key, tuple[str, float, float]] = {}
        if self.directory is not None:
            own = _file_of(self.directory, os.getpid())
            for path in glob.glob(os.path.join(self.directory, FILE_PREFIX + "*.json")):
                if path == own:
                    continue
                try:
                    with open(path) as stream:
                        entries = json.load(stream)
                except (OSError, ValueError):
                    continue  # a worker that just died, or a file from another version: skip it
                for name, pairs, trace_id, value, when in entries:
                    key = (name, tuple(tuple(pair) for pair in pairs))
                    if key not in merged or merged[key][2] < when:
                        merged[key] = (trace_id, value, when)
        with self._lock:
            for key, exemplar in self._mine.items():
                if key not in merged or merged[key][2] < exemplar[2]:
                    merged[key] = exemplar
        return merged

    def attach(self, families: Iterable) -> list:
        """The metric families with each `_bucket` sample given its bucket's newest exemplar, where one exists."""
        families = list(families)
        exemplars = self._all()
        if not exemplars:
            return families
        for family in families:
            if family.type != "histogram":
                continue
            for index, sample in enumerate(family.samples):
                if not sample.name.endswith("_bucket"):
                    continue
                found = exemplars.get((sample.name, tuple(sorted(sample.labels.items()))))
                if found is not None:
                    trace_id, value, when = found
                    family.samples[index] = sample._replace(exemplar=Exemplar({EXEMPLAR_LABEL: trace_id}, value, when))
        return families
