"""Images handed to Triton through system shared memory instead of inside the gRPC message.

Where the gateway and Triton share a host (and /dev/shm), each worker keeps a few regions registered with
Triton; a request copies its pixels into a free one and the ModelInfer message only names it. That skips
protobuf serialization, the HTTP/2 transfer and Triton's copy out of the message for the 0.3-5 MB of
pixels. Where Triton cannot open the regions (another host, a container without the host's /dev/shm), the
first registration says so and the worker sends pixels inline from then on.
"""
from __future__ import annotations

import errno
import glob
import itertools
import logging
import os
import secrets
import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from gateway.logging_setup import Throttled

log = logging.getLogger(__name__)

REGION_PREFIX = "facemask-gateway-"  # Triton region name and /dev/shm key of every region the gateway makes
SHM_DIR = "/dev/shm"  # where POSIX shared memory keys live on Linux
MAX_REGIONS_PER_WORKER = 64  # beyond this many images in flight in one worker, the extra ones go inline
MAX_REGION_BYTES = 64 * 1024 * 1024  # larger images go inline rather than pinning a huge region per thread
# Triton's answers when it cannot map a region, and when it does not know one (it restarted and forgot).
UNMAPPABLE_HINT = "unable to open shared memory region"
UNKNOWN_REGION_HINT = "unable to find shared memory region"
# Creating a region failed for good: /dev/shm read-only, not ours, missing, no POSIX shared memory at all, or
# names this long refused (macOS allows 31 characters); anything else (EMFILE, ENOMEM) may pass.
UNUSABLE_SHM_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOSYS,
                                 errno.ENAMETOOLONG, errno.EINVAL})


# Why a worker in "system" mode sent an image inside the request (gateway_triton_inline_fallbacks_total's reason):
# for good, this host's /dev/shm is unusable or Triton cannot map it; for that image, a region could not be made
# (EMFILE, ENOMEM), every region was in use, or the image was larger than a region.
SHM_UNUSABLE, UNMAPPABLE, CREATE_FAILED, POOL_FULL, TOO_LARGE = (
    "shm_unusable", "unmappable", "create_failed", "pool_full", "too_large")
INLINE_REASONS = (SHM_UNUSABLE, UNMAPPABLE, CREATE_FAILED, POOL_FULL, TOO_LARGE)
FAILED_CREATION_LOG_INTERVAL_S = 60.0
_failed_creations = Throttled(log, FAILED_CREATION_LOG_INTERVAL_S)


class SharedMemoryUnavailable(Exception):
    """Triton cannot map this host's shared memory: it runs elsewhere or in a container without /dev/shm."""


class NoRegionForNow(Exception):
    """This image gets no region (`reason`: CREATE_FAILED or POOL_FULL); the next one may."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def region_bytes(max_side: int, max_pixels: int) -> int:
    """Room for the largest image the gateway sends: max_side x max_side x 3 after downscaling, capped."""
    pixels = min(max_pixels, max_side * max_side) if max_side > 0 else max_pixels
    return min(3 * pixels, MAX_REGION_BYTES)


def is_unknown_region(error: InferenceServerException) -> bool:
    return UNKNOWN_REGION_HINT in (error.message() or "").lower()


def worker_prefix(pid: int) -> str:
    """The start of the name (and /dev/shm key) of every region the gateway worker `pid` makes."""
    return f"{REGION_PREFIX}{pid}-"


def registered_regions(client, prefixes: str | tuple[str, ...] = REGION_PREFIX) -> dict[str, dict]:
    """Triton's system shared-memory regions whose names start with one of `prefixes` (name -> status)."""
    regions = client.get_system_shared_memory_status(as_json=True).get("regions", {})
    return {name: region for name, region in regions.items() if name.startswith(prefixes)}


class Region:
    """One shared-memory region of this process, registered with Triton under its own name."""

    def __init__(self, name: str, byte_size: int):
        self.name, self.key, self.byte_size = name, "/" + name, byte_size
        self.handle = shm.create_shared_memory_region(name, self.key, byte_size, create_only=True)

    def register(self, client) -> None:
        client.register_system_shared_memory(self.name, self.key, self.byte_size)

    def write(self, array: np.ndarray) -> None:
        shm.set_shared_memory_region(self.handle, [array])

    def destroy(self) -> None:
        shm.destroy_shared_memory_region(self.handle)


class RegionPool:
    """The regions of one worker process: leased to one request at a time, created and registered on demand."""

    def __init__(self, client, byte_size: int):
        self.client = client  # a tritonclient.grpc.InferenceServerClient
        self.byte_size = byte_size
        self.prefix = f"{worker_prefix(os.getpid())}{secrets.token_hex(4)}-"
        self.unavailable: str | None = None  # for good: SHM_UNUSABLE or UNMAPPABLE, once found out
        self._lock = threading.Lock()
        self._free: list[Region] = []
        self._all: list[Region] = []  # registered by their creator; what register_again registers again
        self._creating = 0  # regions being created and registered now (counted against the limit)
        self._serial = itertools.count()  # a name is never reused, even after a failed registration
        self._swept = False

    def refusal(self, array: np.ndarray) -> str | None:
        """Why `array` cannot travel through this pool at all (SHM_UNUSABLE, UNMAPPABLE, TOO_LARGE), else None."""
        if self.unavailable is not None:
            return self.unavailable
        return TOO_LARGE if array.nbytes > self.byte_size else None

    @contextmanager
    def lease(self) -> Iterator[Region]:
        """A registered region for one request; NoRegionForNow when none can be had (send that image inline)."""
        region = self._take()
        _failed_creations.settle()  # a region again: what failed meanwhile is reported now, not at the next failure
        try:
            yield region
        finally:
            with self._lock:
                self._free.append(region)

    def _take(self) -> Region:
        with self._lock:
            if self._free:
                return self._free.pop()
            if len(self._all) + self._creating >= MAX_REGIONS_PER_WORKER:
                raise NoRegionForNow(POOL_FULL)
            self._creating += 1
            name = f"{self.prefix}{next(self._serial)}"
        # A region joins the pool only once registered: until then a concurrent register_again (Triton restarted)
        # must not register it, or this registration would fail as a duplicate.
        try:
            try:
                region = Region(name, self.byte_size)
            except shm.SharedMemoryException as error:
                cause = error.__cause__
                if isinstance(cause, OSError) and cause.errno in UNUSABLE_SHM_ERRNOS:  # no usable /dev/shm here
                    self.unavailable = SHM_UNUSABLE
                    raise SharedMemoryUnavailable(f"cannot create a shared-memory region here: {cause}") from None
                # Out of descriptors or memory for now: the next image tries again, and while it lasts every
                # image would say so.
                _failed_creations.warning(str(getattr(cause, "errno", "")), "could not create a shared-memory "
                                          "region (%s); this image goes inside the request", cause or error)
                raise NoRegionForNow(CREATE_FAILED) from None
            try:
                self._register(region)
            except BaseException:
                region.destroy()
                raise
            with self._lock:
                self._all.append(region)
            return region
        finally:
            with self._lock:
                self._creating -= 1

    def _register(self, region: Region) -> None:
        self._register_or_give_up(region)
        if not self._swept:  # Triton mapped our region, so its /dev/shm is ours: a missing file is an orphan
            self._swept = True
            self.unregister_orphans()

    def register_again(self) -> None:
        """After a Triton restart: register every region of this process again (Triton forgets them).

        A Triton that comes back unable to open them (a container restarted with a /dev/shm of its own) makes this
        worker send inline from then on, as at a first registration.
        """
        with self._lock:
            regions = list(self._all)
        for region in regions:
            try:
                self._register_or_give_up(region)
            except InferenceServerException as error:
                if "already" not in (error.message() or "").lower():  # another thread got there first
                    raise

    def _register_or_give_up(self, region: Region) -> None:
        """Register `region`; Triton unable to map it makes the pool unavailable (SharedMemoryUnavailable)."""
        try:
            region.register(self.client)
        except InferenceServerException as error:
            if UNMAPPABLE_HINT in (error.message() or "").lower():
                self.unavailable = UNMAPPABLE
                raise SharedMemoryUnavailable(error.message()) from None
            raise

    def unregister_orphans(self) -> None:
        """Unregister gateway regions Triton still holds whose memory is gone (a worker that was killed)."""
        try:
            regions = registered_regions(self.client)
        except InferenceServerException:
            return  # Triton down: the registration that follows reports it
        for name, region in regions.items():
            if not os.path.exists(os.path.join(SHM_DIR, region.get("key", "").lstrip("/"))):
                try:
                    self.client.unregister_system_shared_memory(name)
                    log.info("unregistered orphaned shared memory region %s from Triton", name)
                except InferenceServerException:
                    pass

    def close(self) -> None:
        """Unregister and free every region (worker exit); in-flight requests must be over."""
        with self._lock:
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            try:
                self.client.unregister_system_shared_memory(region.name)
            except InferenceServerException:
                pass  # Triton gone: nothing left to unregister
            try:
                region.destroy()
            except FileNotFoundError:
                pass  # removed from outside already (e.g. by hand); the rest are still freed


def remove_region_files(pid: int) -> None:
    """Free the shared memory of a worker that died without cleaning up (gunicorn's master, child_exit).

    Triton may still map it; the next worker to register a region unregisters such orphans.
    """
    for path in glob.glob(os.path.join(SHM_DIR, worker_prefix(pid) + "*")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
