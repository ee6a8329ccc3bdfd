"""Prototype: the gateway's Triton call with the image in system shared memory instead of inside the gRPC message.

The gateway JPEG-decodes each upload and sends the raw uint8 pixels (0.3-2 MB a frame) in the gRPC
request: the client serializes them into protobuf and Triton copies them out again. With Triton's
system shared memory the client copies the pixels into a region both processes map, and the request
only names the region. This measures what that would save, on the benchmark image set, against the
same tritonserver, with the gateway's own call shape (one frame, all five outputs):

    python -m benchmarks.shm_prototype                    # 3 interleaved passes of the 10 frames each way
    python -m benchmarks.shm_prototype --passes 10 --output shm.json

Both ways are interleaved frame by frame (plain, shared memory, plain, ...) so a busy machine
affects both alike. Reported per way: client-side p50 latency, client CPU ms per call (the gateway
worker's cost) and Triton CPU ms per call (tritonserver and its model processes). Only works where
client and server share the machine (loopback deployments such as `make run`); the gateway would
keep one region per worker thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.common import machine_info, machine_line, uptime_line, write_json
from benchmarks.cpu import CpuMeter, triton_session
from benchmarks.image_set import benchmark_images, describe
from benchmarks.model_inputs import ENSEMBLE
from ensemble.reference import DEFAULT_REPOSITORY
from ensemble.triton.launcher import TritonServer

SCHEMA = "facemask.bench.shm_prototype/1"
OUTPUTS = ("BOXES", "SCORES", "LABELS", "LABEL_SCORES", "NUM_DETECTIONS")


class PlainClient:
    """What the gateway does today: pixels inside the gRPC request."""

    name = "grpc"

    def __init__(self, grpc_url: str):
        import tritonclient.grpc as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]

    def infer(self, frame: np.ndarray) -> int:
        batch = np.ascontiguousarray(frame[np.newaxis])
        tensor = self.grpc.InferInput("IMAGE", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = self.client.infer(ENSEMBLE, [tensor], outputs=self.outputs)
        return int(result.as_numpy("NUM_DETECTIONS").reshape(-1)[0])

    def close(self) -> None:
        self.client.close()


class SharedMemoryClient(PlainClient):
    """Pixels copied into a registered system shared-memory region; the request carries its name only."""

    name = "system_shm"

    def __init__(self, grpc_url: str, capacity: int):
        import tritonclient.utils.shared_memory as shm

        super().__init__(grpc_url)
        self.shm = shm
        self.region = f"gateway-{uuid.uuid4().hex[:12]}"
        self.handle = shm.create_shared_memory_region(self.region, f"/{self.region}", capacity)
        self.client.register_system_shared_memory(self.region, f"/{self.region}", capacity)

    def infer(self, frame: np.ndarray) -> int:
        batch = np.ascontiguousarray(frame[np.newaxis])
        self.shm.set_shared_memory_region(self.handle, [batch])
        tensor = self.grpc.InferInput("IMAGE", list(batch.shape), "UINT8")
        tensor.set_shared_memory(self.region, batch.nbytes)
        result = self.client.infer(ENSEMBLE, [tensor], outputs=self.outputs)
        return int(result.as_numpy("NUM_DETECTIONS").reshape(-1)[0])

    def close(self) -> None:
        try:
            self.client.unregister_system_shared_memory(self.region)
        finally:
            self.shm.destroy_shared_memory_region(self.handle)
            super().close()


def run(*, passes: int = 3, server=None, repository: Path = DEFAULT_REPOSITORY, log=print) -> dict:
    images = benchmark_images()
    frames = list(images.values())
    document = {"schema": SCHEMA, "machine": machine_info(), "image_set": describe(images), "passes": passes}
    with TritonServer(repository) if server is None else _Borrowed(server) as triton:
        clients = [PlainClient(triton.grpc_url), SharedMemoryClient(triton.grpc_url, max(f.nbytes for f in frames))]
        triton_cpu = CpuMeter(triton_session(triton.grpc_url))
        latency = {client.name: [] for client in clients}
        client_cpu = {client.name: 0.0 for client in clients}
        server_cpu = {client.name: 0.0 for client in clients}
        try:
            for frame in frames:  # warm-up, and both ways must find the same faces
                counts = {client.name: client.infer(frame) for client in clients}
                if len(set(counts.values())) != 1:
                    raise RuntimeError(f"the two ways disagree on a frame: {counts}")
            for _ in range(passes):
                for frame in frames:
                    for client in clients:
                        triton_cpu.start()
                        cpu, began = time.process_time(), time.perf_counter()
                        client.infer(frame)
                        latency[client.name].append((time.perf_counter() - began) * 1e3)
                        client_cpu[client.name] += time.process_time() - cpu
                        server_cpu[client.name] += triton_cpu.stop() or 0.0
        finally:
            for client in clients:
                client.close()
    calls = passes * len(frames)
    document["ways"] = {name: {"calls": calls, "p50_ms": round(float(np.median(values)), 2),
                               "mean_ms": round(float(np.mean(values)), 2),
                               "client_cpu_ms_per_call": round(client_cpu[name] * 1e3 / calls, 2),
                               "triton_cpu_ms_per_call": round(server_cpu[name] * 1e3 / calls, 2)}
                        for name, values in latency.items()}
    plain, shared = document["ways"]["grpc"], document["ways"]["system_shm"]
    document["saving"] = {key: round(plain[key] - shared[key], 2)
                          for key in ("p50_ms", "client_cpu_ms_per_call", "triton_cpu_ms_per_call")}
    document["uptime_end"] = uptime_line()
    for name, way in document["ways"].items():
        log(f"{name:10s}: p50 {way['p50_ms']:6.2f} ms  client cpu {way['client_cpu_ms_per_call']:5.2f} ms/call  "
            f"triton cpu {way['triton_cpu_ms_per_call']:6.2f} ms/call  ({calls} calls)")
    log(f"shared memory saves: {document['saving']}")
    return document


class _Borrowed:
    """A running server used as a context manager without stopping it."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        return self.server

    def __exit__(self, *exc_info):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shm_prototype", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=3, help="interleaved passes over the image set (default 3)")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--output", type=Path, help="write the result document here (JSON)")
    args = parser.parse_args(argv)
    document = run(passes=args.passes, repository=args.model_repository)
    print(f"machine: {machine_line(document['machine'])}")
    if args.output:
        write_json(args.output, document)
        print(f"result: {args.output}")
    else:
        print(json.dumps(document["saving"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
