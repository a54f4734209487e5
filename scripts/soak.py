"""Soak test (outside CI): the real daemon with 16 functions under mixed traffic.

    python scripts/soak.py --minutes 10 [--functions 16] [--out soak.json]

Starts ``zpcid serve`` (supervisor + one worker per function) with memory,
dma-engine and virtio-blk functions, and drives every function from its own
VMM loop: attach, config and register traffic, DMA (memory-function copies,
dma-engine copy/fill/CRC-32C, virtio-blk writes and reads verified), detach,
again.  Every ``--every`` seconds it samples the daemon's process tree (RSS
and open descriptors of the supervisor and each worker).  At the end it
compares the samples after the warm-up with the last ones: RSS and descriptor
counts must be flat (docs/reliability.md records a run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time

import trio

from zpcid.devices import dma_engine as de
from zpcid.devices.memory import REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_STATUS, REG_SCRATCH
from zpcid.vfio_user.memfd import Memfd
from zpcid.vmm import client as zclient
from zpcid.vmm.virtio_driver import GuestMemory, open_blk

KINDS = ("memory", "dma-engine", "virtio-blk")


def config(directory: str, n: int) -> tuple[str, list[tuple[str, str]]]:
    lines = ["[daemon]", f'runtime-dir = "{directory}/run"', 'log-level = "warning"']
    fns = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        name = f"s{i}"
        lines += ["", "[[function]]", f'type = "{kind}"', f"fid = {i + 1}", f"uid = {i + 1}", f'name = "{name}"']
        if kind == "virtio-blk":
            lines += [f'path = "{directory}/disk{i}.img"', 'size = "8M"']
        fns.append((kind, name))
    path = os.path.join(directory, "soak.toml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, fns


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            for child in f.read().split():
                out += tree(int(child))
    except OSError:
        pass
    return out


def sample(pid: int) -> dict:
    rss = fds = 0
    procs = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
            fds += len(os.listdir(f"/proc/{p}/fd"))
            procs += 1
        except OSError:
            pass
    return {"t": round(time.monotonic(), 1), "rss": rss, "fds": fds, "procs": procs}


async def drive_memory(path: str, rng: random.Random, counts: dict) -> None:
    with Memfd(1 << 20, "zpcid-soak") as mem:
        async with zclient.connect(path) as c:
            await c.region_write(7, 4, struct.pack("<H", 0x6))
            await c.dma_map(0x10000000, 1 << 20, mem.fd, 0)
            for _ in range(rng.randrange(20, 200)):
                v = rng.getrandbits(32)
                await c.region_write(4, REG_SCRATCH, struct.pack("<I", v), via_mmap=False)
                assert struct.unpack("<I", await c.region_read(4, REG_SCRATCH, 4, via_mmap=False))[0] == v
                await c.region_write(4, REG_DMA_ADDR, struct.pack("<QI", 0x10000000, 4096), via_mmap=False)
                await c.region_write(4, REG_DMA_CMD, struct.pack("<I", rng.choice([1, 2])), via_mmap=False)
                while struct.unpack("<I", await c.region_read(4, REG_DMA_STATUS, 4, via_mmap=False))[0] == 2:
                    await trio.sleep(0.001)
                counts["ops"] += 3


async def drive_dma_engine(path: str, rng: random.Random, counts: dict) -> None:
    size = 4 << 20
    with Memfd(size, "zpcid-soak") as mem:
        mem.write(0, os.urandom(1 << 20))
        async with zclient.connect(path) as c:
            await c.region_write(7, 4, struct.pack("<H", 0x6))
            await c.dma_map(0, size, mem.fd, 0)
            for _ in range(rng.randrange(10, 100)):
                op = rng.choice([de.OP_COPY, de.OP_FILL, de.OP_CRC32C])
                n = rng.choice([4096, 65536, 1 << 20])
                await c.region_write(0, de.REG_SRC, struct.pack("<QQIIQ", 0, 2 << 20, n, op, 0x1234), via_mmap=False)
                await c.region_write(0, de.REG_DOORBELL, b"\1\0\0\0", via_mmap=False)
                while True:
                    st, = struct.unpack("<I", await c.region_read(0, de.REG_STATUS, 4, via_mmap=False))
                    if not st & de.STATUS_BUSY:
                        break
                    await trio.sleep(0.001)
                assert de.status_error(st) == 0, st
                counts["ops"] += 1


async def drive_virtio_blk(path: str, rng: random.Random, counts: dict) -> None:
    async with zclient.connect(path) as c:
        mem = GuestMemory(4 << 20)
        try:
            async with open_blk(c, mem, num_queues=1) as drv:
                for _ in range(rng.randrange(10, 100)):
                    sector = rng.randrange(0, (8 << 11) - 64)  # 8 MiB of 512-byte sectors
                    data = os.urandom(512 * rng.choice([1, 8, 64]))
                    await drv.write(0, sector, data)
                    assert await drv.read(0, sector, len(data)) == data
                    counts["ops"] += 2
        finally:
            mem.close()


DRIVERS = {"memory": drive_memory, "dma-engine": drive_dma_engine, "virtio-blk": drive_virtio_blk}


async def vmm_loop(kind: str, path: str, seed: int, deadline: float, counts: dict) -> None:
    rng = random.Random(seed)
    while trio.current_time() < deadline:
        await DRIVERS[kind](path, rng, counts)
        counts["sessions"] += 1


async def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="zpcid-soak-") as directory:
        cfg, fns = config(directory, args.functions)
        script = os.path.join(os.path.dirname(sys.executable), "zpcid")
        proc = subprocess.Popen([script, "serve", "--config", cfg],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(directory, "log"), "wb"))
        try:
            run_dir = os.path.join(directory, "run")
            with trio.fail_after(60):
                while not all(os.path.exists(os.path.join(run_dir, f"{n}.sock")) for _, n in fns):
                    await trio.sleep(0.1)
            await trio.sleep(1)
            counts = {"ops": 0, "sessions": 0}
            samples = [sample(proc.pid)]
            deadline = trio.current_time() + args.minutes * 60
            async with trio.open_nursery() as nursery:
                for i, (kind, name) in enumerate(fns):
                    nursery.start_soon(vmm_loop, kind, os.path.join(run_dir, f"{name}.sock"), i, deadline, counts)
                while trio.current_time() < deadline:
                    await trio.sleep(args.every)
                    samples.append(sample(proc.pid))
                    print(json.dumps(samples[-1] | counts), flush=True)
            await trio.sleep(2)  # the last sessions detach
            samples.append(sample(proc.pid))
            alive = proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    warm = samples[min(len(samples) - 1, max(1, int(60 / args.every)))]  # after 1 minute
    last = samples[-1]
    return {"functions": args.functions, "minutes": args.minutes, "alive": alive, **counts,
            "rss_start": samples[0]["rss"], "rss_warm": warm["rss"], "rss_end": last["rss"],
            "rss_max": max(s["rss"] for s in samples),
            "fds_start": samples[0]["fds"], "fds_warm": warm["fds"], "fds_end": last["fds"],
            "fds_max": max(s["fds"] for s in samples), "procs": last["procs"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--functions", type=int, default=16)
    p.add_argument("--every", type=float, default=15)
    p.add_argument("--out")
    args = p.parse_args()
    result = trio.run(run, args)
    text = json.dumps(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    flat = result["alive"] and result["fds_end"] <= result["fds_warm"] + 2 \
        and result["rss_end"] <= result["rss_warm"] * 1.10
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
