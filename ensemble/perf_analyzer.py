"""Triton's perf_analyzer 2.51.0, the same release as the pip-installed tritonserver, without installing it.

PyPI has no usable `perf-analyzer` package (a placeholder) and installing `tritonclient==2.51.0`
would pin protobuf<5 into the venv and break the OpenTelemetry exporters. So the binary is
unzipped from the `tritonclient==2.51.0` manylinux1 wheel (2.55+ binaries need glibc 2.38) and
its one non-system dependency, `libcudart.so.12`, from the `nvidia-cuda-runtime-cu12` wheel;
both wheels are fetched with `pip download` into a cache outside git and checked against
pinned sha256 digests. `libb64.so.0d` comes from Debian's `libb64-0d` (`make system-deps`).

    python -m ensemble.perf_analyzer            # fetch if needed; print the command prefix
    python -m ensemble.perf_analyzer --check    # also run `perf_analyzer --version`
    python -m ensemble.perf_analyzer -- -m mask_detection -u 127.0.0.1:8001 -i grpc

`ensure_perf_analyzer()` is idempotent and safe to call from concurrent processes (file lock).
This module also writes perf_analyzer's `--input-data` JSON and reads its `-f` CSV reports.
"""
from __future__ import annotations

import argparse
import base64
import csv
import fcntl
import json
import os
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ensemble.weights import sha256_of

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "PERF_ANALYZER_CACHE"
BINARY_ENV = "PERF_ANALYZER"  # an already working perf_analyzer; skips the download entirely
VERSION = "2.51.0"
DOWNLOAD_TIMEOUT_S = 600


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be obtained, could not start, or reported a failure; the message says why."""


@dataclass(frozen=True)
class PinnedWheel:
    """A wheel fetched with `pip download`, its digest, and the files taken out of it (member -> cache path)."""

    project: str
    version: str
    platform: str
    filename: str
    sha256: str
    members: Mapping[str, str]

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


TRITONCLIENT = PinnedWheel(
    project="tritonclient", version=VERSION, platform="manylinux1_x86_64",
    filename=f"tritonclient-{VERSION}-py3-none-manylinux1_x86_64.whl",
    sha256="c485bb0123bdf310f90bc8b03d3489b28df2ffed55b30c7eee0b795b48113d52",
    members={f"tritonclient-{VERSION}.data/data/bin/perf_analyzer": "bin/perf_analyzer"},
)
# CUDA 12.6 is what the Triton 24.10 (= 2.51.0) release was built against.
CUDA_RUNTIME = PinnedWheel(
    project="nvidia-cuda-runtime-cu12", version="12.6.77", platform="manylinux2014_x86_64",
    filename="nvidia_cuda_runtime_cu12-12.6.77-py3-none-manylinux2014_x86_64.whl",
    sha256="a84d15d5e1da416dd4774cb42edf5e954a3e60cc945698dc1d5be02321c44dc8",
    members={"nvidia/cuda_runtime/lib/libcudart.so.12": "lib/libcudart.so.12"},
)
WHEELS = (TRITONCLIENT, CUDA_RUNTIME)
STAMP_FILE = "READY.json"
# What to do about a shared library the dynamic loader cannot find.
LIBRARY_HINTS = {
    "libb64.so.0d": "install Debian's libb64-0d (`make system-deps`, or `apt-get install libb64-0d`)",
    "libcudart.so.12": ("from the nvidia-cuda-runtime-cu12 wheel: the managed cache keeps it in <cache>/lib "
                        "(delete the cache to extract it again); for a $PERF_ANALYZER binary put it in ../lib "
                        "beside the binary or on LD_LIBRARY_PATH"),
}


def default_cache_dir() -> Path:
    """$PERF_ANALYZER_CACHE, else .cache/perf_analyzer/<version> in the repository (git-ignored)."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else REPO_ROOT / ".cache" / "perf_analyzer" / VERSION


@dataclass(frozen=True)
class PerfAnalyzer:
    """A perf_analyzer binary and the directory its libcudart.so.12 lives in."""

    binary: Path
    lib_dir: Path | None = None

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with the library directory first on LD_LIBRARY_PATH."""
        env = dict(os.environ if base is None else base)
        if self.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.lib_dir), env.get("LD_LIBRARY_PATH")]))
        return env

    def prefix(self) -> list[str]:
        """A ready-to-run command prefix: `env LD_LIBRARY_PATH=... perf_analyzer`; append the arguments."""
        if self.lib_dir is None:
            return [str(self.binary)]
        return ["env", f"LD_LIBRARY_PATH={self.env()['LD_LIBRARY_PATH']}", str(self.binary)]

    def shell_prefix(self) -> str:
        return shlex.join(self.prefix())

    def run(self, args: Sequence[str], *, timeout: float | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run perf_analyzer with `args`, capturing its output; raise PerfAnalyzerError on failure if `check`."""
        command = [str(self.binary), *map(str, args)]
        try:
            result = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise PerfAnalyzerError(f"perf_analyzer did not finish in {timeout:.0f} s: {shlex.join(command)}\n"
                                    f"{_tail(exc.stdout)}{_tail(exc.stderr)}") from exc
        if check and result.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer exited with code {result.returncode}: {shlex.join(command)}\n"
                                    f"{_tail(result.stdout)}{_tail(result.stderr)}")
        return result

    def version(self) -> str:
        """The version line perf_analyzer prints, e.g. "Perf Analyzer Version 2.51.0 (commit unknown)"."""
        self.check_libraries()
        result = self.run(["--version"], timeout=30)
        output = result.stdout + result.stderr  # 2.51 prints it on stderr
        line = next((line for line in output.splitlines() if "Version" in line), "").strip()
        if not line:
            raise PerfAnalyzerError(f"`perf_analyzer --version` printed no version:\n{_tail(output)}")
        return line

    def missing_libraries(self) -> list[str]:
        """Shared libraries the dynamic loader cannot find for the binary (via ldd)."""
        try:
            result = subprocess.run(["ldd", str(self.binary)], env=self.env(), capture_output=True, text=True,
                                    timeout=30)
        except FileNotFoundError:  # no ldd: let the binary's own start-up error speak
            return []
        return [line.split("=>")[0].strip() for line in result.stdout.splitlines() if "not found" in line]

    def check_libraries(self) -> None:
        """Raise with the fix for every shared library perf_analyzer would fail to load."""
        missing = self.missing_libraries()
        if missing:
            fixes = "; ".join(f"{name}: {LIBRARY_HINTS.get(name, 'not found by the loader')}" for name in missing)
            raise PerfAnalyzerError(f"perf_analyzer ({self.binary}) cannot start, missing shared libraries: {fixes}")


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    if not text:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) + "\n"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialize setup between processes sharing the cache (tests and benchmarks may start together)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _stamp() -> dict:
    return {wheel.filename: wheel.sha256 for wheel in WHEELS}


def _ready(cache: Path) -> bool:
    """Whether a previous run extracted exactly these pinned wheels into `cache`."""
    try:
        stamp = json.loads((cache / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = [cache / target for wheel in WHEELS for target in wheel.members.values()]
    return stamp == _stamp() and all(path.is_file() for path in files)


def _download(wheel: PinnedWheel, wheels_dir: Path, log) -> Path:
    """The pinned wheel in `wheels_dir`, downloaded with pip unless a verified copy is already there."""
    path = wheels_dir / wheel.filename
    if path.is_file() and sha256_of(path) == wheel.sha256:
        return path
    path.unlink(missing_ok=True)
    log(f"downloading {wheel.requirement} ({wheel.platform}) with pip")
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--platform", wheel.platform, "--dest", str(wheels_dir), wheel.requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerError(f"`pip download {wheel.requirement}` took over {DOWNLOAD_TIMEOUT_S} s") from exc
    if result.returncode != 0 or not path.is_file():
        found = sorted(p.name for p in wheels_dir.glob("*.whl"))
        raise PerfAnalyzerError(f"`{shlex.join(command)}` failed (exit {result.returncode}); expected "
                                f"{wheel.filename}, found {found}\n{_tail(result.stderr)}")
    actual = sha256_of(path)
    if actual != wheel.sha256:
        path.unlink()
        raise PerfAnalyzerError(f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}; "
                                "the download was removed")
    return path


def _extract(wheel_path: Path, wheel: PinnedWheel, cache: Path) -> None:
    """Copy the wanted members out of the wheel, atomically, executable."""
    with zipfile.ZipFile(wheel_path) as archive:
        for member, target in wheel.members.items():
            try:
                data = archive.read(member)
            except KeyError as exc:
                raise PerfAnalyzerError(f"{wheel_path.name} has no {member}") from exc
            dest = cache / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(dest.name + ".partial")
            partial.write_bytes(data)
            partial.chmod(0o755)
            os.replace(partial, dest)


def ensure_perf_analyzer(cache_dir: Path | None = None, *, log=lambda message: None) -> PerfAnalyzer:
    """A runnable perf_analyzer 2.51.0: from $PERF_ANALYZER if set, else fetched into the cache once.

    Raises PerfAnalyzerError when a download fails, a digest does not match, or a shared library is missing.
    """
    configured = os.environ.get(BINARY_ENV)
    if configured:
        binary = Path(configured)
        lib_dir = binary.resolve().parent.parent / "lib"
        analyzer = PerfAnalyzer(binary, lib_dir if lib_dir.is_dir() else None)
        if not analyzer.binary.is_file():
            raise PerfAnalyzerError(f"${BINARY_ENV}={configured} is not a file")
    else:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        with _locked(cache):
            if not _ready(cache):
                (cache / STAMP_FILE).unlink(missing_ok=True)
                wheels_dir = cache / "wheels"
                wheels_dir.mkdir(parents=True, exist_ok=True)
                for wheel in WHEELS:
                    _extract(_download(wheel, wheels_dir, log), wheel, cache)
                (cache / STAMP_FILE).write_text(json.dumps(_stamp(), indent=2) + "\n")
                log(f"perf_analyzer {VERSION} ready in {cache}")
        analyzer = PerfAnalyzer(cache / TRITONCLIENT.members[next(iter(TRITONCLIENT.members))],
                                cache / "lib")
    analyzer.check_libraries()
    return analyzer


# --- --input-data JSON -------------------------------------------------------------------------------------------

def tensor_entry(array: np.ndarray) -> dict:
    """One tensor of one request as perf_analyzer reads it: raw bytes in base64 plus the (batch-less) shape.

    Base64 keeps a 600x512x3 image at ~1.2 MB of JSON instead of ~3.5 MB of decimal numbers, and
    is the only form perf_analyzer accepts for raw bytes; "shape" is required for variable-size inputs.
    """
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.byteorder == ">":
        contiguous = contiguous.astype(contiguous.dtype.newbyteorder("<"))
    return {"content": {"b64": base64.b64encode(contiguous.tobytes()).decode("ascii")},
            "shape": [int(dim) for dim in contiguous.shape]}


def input_data(requests: Sequence[Mapping[str, np.ndarray]]) -> dict:
    """perf_analyzer's `--input-data` document: one stream whose steps are `requests`, sent in turn.

    Each request maps input names to one sample (no batch dimension); run perf_analyzer with `-b 1`.
    """
    if not requests:
        raise ValueError("input_data needs at least one request")
    return {"data": [{name: tensor_entry(array) for name, array in request.items()} for request in requests]}


def write_input_data(path: Path, requests: Sequence[Mapping[str, np.ndarray]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(requests)))
    return path


# --- -f CSV reports ----------------------------------------------------------------------------------------------

# perf_analyzer's CSV columns (microseconds unless named otherwise) -> our JSON keys.
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Request Rate": "request_rate",
    "Inferences/Second": "throughput_infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "p50_latency_us",
    "p90 latency": "p90_latency_us",
    "p95 latency": "p95_latency_us",
    "p99 latency": "p99_latency_us",
    "Avg latency": "avg_latency_us",
    "request/response": "request_per_response",
    "response wait": "response_wait_us",
}


def _number(text: str) -> float | int | str:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def parse_csv(path: Path) -> list[dict]:
    """One dict per concurrency level (or request rate) from perf_analyzer's `-f` report, in run order.

    Known columns get snake_case keys with their unit (see CSV_COLUMNS); any other column
    (e.g. from --verbose-csv) is kept under its own name. Latencies are in microseconds.
    """
    text = Path(path).read_text()
    rows = []
    for record in csv.DictReader(line for line in text.splitlines() if line.strip()):
        row = {}
        for column, value in record.items():
            if column is None or value is None:
                continue
            row[CSV_COLUMNS.get(column.strip(), column.strip())] = _number(value)
        if "throughput_infer_per_s" in row:  # the report ends with a server-metrics table in --verbose-csv mode
            rows.append(row)
    if not rows:
        raise PerfAnalyzerError(f"{path}: no measurements in perf_analyzer's CSV report:\n{_tail(text)}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensemble.perf_analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, help=f"default: ${CACHE_ENV} or {default_cache_dir()}")
    parser.add_argument("--check", action="store_true", help="also run `perf_analyzer --version`")
    parser.add_argument("args", nargs="*", help="after `--`: run perf_analyzer with these arguments")
    args = parser.parse_args(argv)
    try:
        analyzer = ensure_perf_analyzer(args.cache_dir, log=lambda message: print(message, file=sys.stderr))
        if args.args:
            return subprocess.call([str(analyzer.binary), *args.args], env=analyzer.env())
        if args.check:
            print(analyzer.version(), file=sys.stderr)
    except PerfAnalyzerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(analyzer.shell_prefix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
