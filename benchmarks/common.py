"""What every benchmark result records: the machine, the software, where results go."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PACKAGES = ("numpy", "opencv-python-headless", "onnxruntime", "nvidia-pytriton", "tritonclient", "grpcio",
            "flask", "gunicorn", "matplotlib")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS says so)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def gpus() -> list[dict]:
    """NVIDIA GPUs as nvidia-smi lists them ([] where there is none or no driver)."""
    binary = shutil.which("nvidia-smi")
    if not binary:
        return []
    try:
        result = subprocess.run([binary, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        name, memory, driver = (part.strip() for part in (line.split(",") + ["", ""])[:3])
        found.append({"name": name, "memory": memory, "driver": driver})
    return found


def uptime_line() -> str:
    """What `uptime` prints (the load average the figures were taken under)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        load = load_average()
        return f"load average: {', '.join(map(str, load))}" if load else "unknown"


def cpu_times() -> dict[str, float] | None:
    """The machine's CPU seconds so far by kind (/proc/stat), for the share a hypervisor stole during a run."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    clock = os.sysconf("SC_CLK_TCK")
    return {"total": sum(ticks) / clock, "idle": (ticks[3] + ticks[4]) / clock, "steal": ticks[7] / clock}


def steal_during(start: dict | None, end: dict | None) -> dict | None:
    """CPU time the hypervisor gave other guests between two `cpu_times()`: a reason figures vary run to run."""
    if not start or not end or end["total"] <= start["total"]:
        return None
    steal = end["steal"] - start["steal"]
    return {"seconds": round(steal, 2), "share": round(steal / (end["total"] - start["total"]), 4)}


def git_revision() -> str | None:
    try:
        result = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def machine_info() -> dict:
    """Cores, CPU model, load at the start (a busy machine makes figures meaningless), OS and versions."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gib": memory_gib(),
        "gpus": gpus(),
        "load_average_1_5_15": load_average(),
        "uptime": uptime_line(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": versions,
        "git": git_revision(),
    }


def timestamp() -> str:
    return time.strftime("%Y%m%dT%H%M%S")


def results_dir(name: str | None = None) -> Path:
    """benchmarks/results/<timestamp>/ (git-ignored), created."""
    path = RESULTS_DIR / (name or timestamp())
    path.mkdir(parents=True, exist_ok=True)
    return path


def latency_summary(seconds: list[float]) -> dict:
    """p50/p95/p99/mean/max of a list of durations, in milliseconds."""
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    if values.size == 0:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50_ms": round(float(p50), 3), "p95_ms": round(float(p95), 3), "p99_ms": round(float(p99), 3),
            "mean_ms": round(float(values.mean()), 3), "max_ms": round(float(values.max()), 3)}


def write_json(path: Path, document: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def machine_line(machine: dict) -> str:
    load = machine.get("load_average_1_5_15")
    return (f"{machine['usable_cores']} usable cores ({machine['cpu_count']} online), {machine['cpu_model']}"
            + (f", load {load[0]:.2f}" if load else ""))
