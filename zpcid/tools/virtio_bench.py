"""virtio-blk benchmark: the reference client + zpcid.vmm.virtio_driver as guest, one process.

4 KiB random-read IOPS and 1 MiB sequential read/write throughput against a
file on tmpfs, next to a direct ``os.pread`` baseline on the same file.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time

import trio

from zpcid.vmm import client as zclient
from zpcid.devices.virtio_blk import VirtioBlkFunction
from zpcid.vfio_user.server import FunctionServer
from zpcid.vmm.virtio_driver import GuestMemory, open_blk

KiB, MiB = 1 << 10, 1 << 20


def _tmpfs_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _pread_iops(fd: int, size: int, duration: float, rng: random.Random) -> float:
    """A plain loop of 4 KiB ``os.pread`` calls at random aligned offsets."""
    blocks = size // (4 * KiB)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration:
        for _ in range(256):
            os.pread(fd, 4 * KiB, rng.randrange(blocks) * 4 * KiB)
        n += 256
    return n / (time.perf_counter() - start)


def _baseline(path: str, size: int, duration: float) -> dict:
    fd = os.open(path, os.O_RDONLY)
    try:
        iops = _pread_iops(fd, size, duration, random.Random(1))
        nbytes, start, off = 0, time.perf_counter(), 0
        while time.perf_counter() - start < duration:
            os.pread(fd, MiB, off)
            nbytes += MiB
            off = (off + MiB) % size
        mbps = nbytes / MiB / (time.perf_counter() - start)
    finally:
        os.close(fd)
    return {"randread_4k_iops": round(iops), "seqread_1m_mib_s": round(mbps, 1)}


async def _timed(duration: float, depth: int, op) -> tuple[int, float]:
    """Run ``op(i)`` from ``depth`` concurrent submitters for ``duration`` seconds."""
    count = 0
    start = time.perf_counter()
    deadline = start + duration

    async def submitter(k: int) -> None:
        nonlocal count
        i = k
        while time.perf_counter() < deadline:
            await op(i)
            count += 1
            i += depth

    async with trio.open_nursery() as n:
        for k in range(depth):
            n.start_soon(submitter, k)
    return count, time.perf_counter() - start


async def run_virtio_bench(*, size: int = 256 * MiB, duration: float = 2.0, depth: int = 16,
                           num_queues: int = 1, io_threads: int = 8, directory: str | None = None,
                           shared: bool = True) -> dict:
    """Measure virtio-blk through zpcid and the os.pread baseline; returns the figures."""
    workdir = tempfile.mkdtemp(prefix="zpcid-vbench-", dir=directory or _tmpfs_dir())
    sockdir = tempfile.mkdtemp(prefix="zpcid-vb")  # short path for AF_UNIX
    path = os.path.join(workdir, "disk.img")
    try:
        with open(path, "wb") as f:
            chunk = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(chunk)
        result = {"size": size, "depth": depth, "num_queues": num_queues, "io_threads": io_threads,
                  "guest_memory": "memfd" if shared else "dma-messages",
                  "baseline": _baseline(path, size, duration)}
        fn = VirtioBlkFunction("bench", path=path, num_queues=num_queues, io_threads=io_threads,
                               queue_size=max(64, depth * 4))
        try:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(FunctionServer(fn, os.path.join(sockdir, "vb.sock")).serve)
                async with zclient.connect(server.path) as c:
                    mem = GuestMemory(64 * MiB + depth * 2 * MiB, shared=shared)
                    try:
                        async with open_blk(c, mem) as drv:
                            result["virtio"] = await _measure(drv, size, duration, depth, num_queues)
                            result["virtio"]["notifications"] = sum(q.notifications for q in drv.queues)
                            result["virtio"]["interrupts"] = sum(q.interrupts for q in drv.queues)
                    finally:
                        mem.close()
                nursery.cancel_scope.cancel()
        finally:
            fn.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    b, v = result["baseline"], result["virtio"]
    result["ratio"] = {k: round(v[k] / b[k], 3) for k in b if b[k]}
    return result


async def run_randread_pairs(*, runs: int = 5, duration: float = 2.0, size: int = 64 * MiB,
                             depth: int = 32, directory: str | None = None, **options) -> dict:
    """4 KiB random-read IOPS, reference client through zpcid vs a plain pread loop on
    the same file, alternated (pread, zpcid, zpcid batched, pread, ...) in one process.

    "virtio": ``depth`` tasks, one request each at a time (a kick and a wait per
    request unless EVENT_IDX suppresses them). "virtio_batch": one task publishing
    ``depth`` requests at once under one kick and waiting for all of them."""
    workdir = tempfile.mkdtemp(prefix="zpcid-vbench-", dir=directory or _tmpfs_dir())
    sockdir = tempfile.mkdtemp(prefix="zpcid-vb")
    path = os.path.join(workdir, "disk.img")
    out: dict = {"depth": depth, "size": size, "where": _fs_type(workdir), "options": options,
                 "baseline": [], "virtio": [], "virtio_batch": []}
    try:
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        fn = VirtioBlkFunction("bench", path=path, queue_size=max(64, depth * 2), **options)
        fd = os.open(path, os.O_RDONLY)
        try:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(FunctionServer(fn, os.path.join(sockdir, "vb.sock")).serve)
                async with zclient.connect(server.path) as c:
                    mem = GuestMemory(64 * MiB)
                    try:
                        async with open_blk(c, mem) as drv:
                            rng = random.Random(2)
                            blocks = size // (4 * KiB)

                            async def randread(i: int) -> None:
                                await drv.read(0, rng.randrange(blocks) * 8, 4 * KiB)

                            async def batch(i: int) -> None:
                                await drv.read_many(0, [(rng.randrange(blocks) * 8, 4 * KiB)
                                                        for _ in range(depth)])

                            await _timed(min(duration, 0.3), depth, randread)  # warm-up
                            for _ in range(runs):
                                out["baseline"].append(_pread_iops(fd, size, duration, rng))
                                n, dt = await _timed(duration, depth, randread)
                                out["virtio"].append(n / dt)
                                n, dt = await _timed(duration, 1, batch)
                                out["virtio_batch"].append(n * depth / dt)
                            out["notifications"] = sum(q.notifications for q in drv.queues)
                            out["interrupts"] = sum(q.interrupts for q in drv.queues)
                    finally:
                        mem.close()
                nursery.cancel_scope.cancel()
        finally:
            os.close(fd)
            fn.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(sockdir, ignore_errors=True)
    return out


def _fs_type(path: str) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts; longest matching mount point)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, fstype, *_ = line.split()
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        pass
    return kind


async def _measure(drv, size: int, duration: float, depth: int, num_queues: int) -> dict:
    rng = random.Random(2)
    blocks = size // (4 * KiB)
    nq = len(drv.queues)

    async def randread(i: int) -> None:
        await drv.read(i % nq, rng.randrange(blocks) * 8, 4 * KiB)

    n, dt = await _timed(duration, depth, randread)
    out = {"randread_4k_iops": round(n / dt)}

    mb_blocks = size // MiB

    async def seqread(i: int) -> None:
        await drv.read(i % nq, (i % mb_blocks) * (MiB // 512), MiB)

    n, dt = await _timed(duration, min(depth, 4), seqread)
    out["seqread_1m_mib_s"] = round(n / dt, 1)
    payload = os.urandom(MiB)

    async def seqwrite(i: int) -> None:
        await drv.write(i % nq, (i % mb_blocks) * (MiB // 512), payload)

    n, dt = await _timed(duration, min(depth, 4), seqwrite)
    out["seqwrite_1m_mib_s"] = round(n / dt, 1)
    return out


if __name__ == "__main__":  # pragma: no cover - manual use
    import json
    import sys

    from zpcid import log

    log.configure(fmt="json", level="warning")
    kw = dict(arg.split("=", 1) for arg in sys.argv[1:])
    print(json.dumps(trio.run(lambda: run_virtio_bench(
        **{k: (float(v) if k == "duration" else v in ("1", "true") if k == "shared" else int(v))
           for k, v in kw.items()})), indent=2))
