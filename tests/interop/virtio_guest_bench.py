"""Guest benchmark: a real Linux guest's virtio_blk on zpcid against QEMU's own virtio-blk-pci.

Run it (QEMU provisioned by .ci/provision-qemu):

    .venv/bin/python tests/interop/virtio_guest_bench.py [--runs 3] [--cache none,writeback]
                                                          [--ref-runs 5] [--json OUT]

For each cache mode and run it boots the same kernel and initramfs twice,
alternating (zpcid, built-in, zpcid, built-in, ...): once with a zpcid
``virtio-blk`` function (vfio-user-pci, the daemon served in this process) and
once with ``-device virtio-blk-pci`` on a ``-drive`` with the same cache mode,
both on a fresh image in /var/tmp (a disk filesystem: O_DIRECT works there).
The guest times busybox dd with direct I/O on /dev/vda (sequential 1 MiB
writes and reads, 4 KiB reads and writes at queue depth 1) against its own
clock. It then measures the reference client (zpcid.vmm.virtio_driver in this
process) doing 4 KiB random reads against a plain ``os.pread`` loop on the same
file, interleaved. Every figure is printed as min/median/max, and each ratio
is taken per interleaved pair.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import qemu as qh  # noqa: E402
from zpcid import log  # noqa: E402
from zpcid.devices.virtio_blk import VirtioBlkFunction  # noqa: E402
from zpcid.tools import virtio_bench  # noqa: E402
from zpcid.vfio_user.server import FunctionServer  # noqa: E402

MiB = 1 << 20
DISK = 64 * MiB
SEQ_MIB = 64  # each sequential test moves the whole disk
QD1_COUNT = 4096  # 4 KiB requests per queue-depth-1 test (16 MiB)
BOOT_TIMEOUT = 900.0

# (name, dd arguments, bytes moved)
TESTS = (
    ("seq_write", f"if=/dev/zero of=/dev/vda bs=1M count={SEQ_MIB} oflag=direct", SEQ_MIB * MiB),
    ("seq_read", f"if=/dev/vda of=/dev/null bs=1M count={SEQ_MIB} iflag=direct", SEQ_MIB * MiB),
    ("read_4k_qd1", f"if=/dev/vda of=/dev/null bs=4k count={QD1_COUNT} iflag=direct", QD1_COUNT * 4096),
    ("write_4k_qd1", f"if=/dev/zero of=/dev/vda bs=4k count={QD1_COUNT} oflag=direct", QD1_COUNT * 4096),
)


def guest_body() -> str:
    # The guest's monotonic clock in ns (busybox date has no %N).
    lines = [harness.WAIT_FOR_VDA,
             "now() { sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list | head -n 1; }"]
    for name, args, _ in TESTS:
        lines.append(f"a=$(now); dd {args} 2>/dev/null || echo 'FAIL_{name.upper()}=1'; b=$(now); "
                     f"echo \"T_{name.upper()}=$a $b\"")
    return "\n".join(lines) + "\n"


def parse(kv: dict[str, str]) -> dict[str, float]:
    """MB/s (10^6 bytes) per test from the guest's T_NAME=start end lines."""
    out = {}
    for name, _, nbytes in TESTS:
        if f"FAIL_{name.upper()}" in kv:
            raise RuntimeError(f"guest dd failed in {name}")
        a, b = (int(x) for x in kv[f"T_{name.upper()}"].split())
        out[name] = nbytes / ((b - a) / 1e9) / 1e6
    return out


def make_disk(directory: str) -> str:
    fd, path = tempfile.mkstemp(prefix="zpcid-gbench-", suffix=".img", dir=directory)
    with os.fdopen(fd, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(DISK // MiB):
            f.write(chunk)
    return path


AIO = {"aio": None}  # --aio: zpcid's engine (None: the function's default)


def zpcid_function(path: str, cache: str) -> VirtioBlkFunction:
    kw = {}
    params = inspect.signature(VirtioBlkFunction.__init__).parameters
    if "cache" in params:
        kw["cache"] = cache  # (a build without the option always uses the page cache)
    if AIO["aio"] and "aio" in params:
        kw["aio"] = AIO["aio"]
    return VirtioBlkFunction("gbench", path=path, num_queues=1, **kw)


async def boot_zpcid(qemu, script: str, path: str, cache: str) -> dict[str, float]:
    fn = zpcid_function(path, cache)
    sock_dir = tempfile.mkdtemp(prefix="zpcid-gb")
    sock = os.path.join(sock_dir, "vb.sock")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(FunctionServer(fn, sock).serve)
            device = harness.vfio_user_device(sock, "zpcid0")
            boot = functools.partial(qh.run_guest, qemu, "x86_64", script,
                                     qemu_args=["-smp", "1", "-device", device],
                                     modules=["virtio_blk"], timeout=BOOT_TIMEOUT)
            result = await trio.to_thread.run_sync(boot)
            nursery.cancel_scope.cancel()
    finally:
        fn.close()
        os.unlink(sock) if os.path.exists(sock) else None
        os.rmdir(sock_dir)
    return _figures(result)


async def boot_builtin(qemu, script: str, path: str, cache: str) -> dict[str, float]:
    drive = f"file={path},format=raw,if=none,id=vd0,cache={cache},aio=threads"
    boot = functools.partial(qh.run_guest, qemu, "x86_64", script,
                             qemu_args=["-smp", "1", "-drive", drive,
                                        "-device", "virtio-blk-pci,drive=vd0,num-queues=1"],
                             modules=["virtio_blk"], timeout=BOOT_TIMEOUT)
    return _figures(await trio.to_thread.run_sync(boot))


def _figures(result) -> dict[str, float]:
    if not result.done:
        raise RuntimeError("guest did not finish:\n" + result.output[-4000:])
    return parse(harness.kv(result.guest_output()))


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}"


async def guest_runs(qemu, caches: list[str], runs: int, directory: str) -> dict:
    script = qh.guest_script_for(qemu, "x86_64", guest_body(), modules=["virtio_blk"])
    out: dict = {}
    for cache in caches:
        samples: dict[str, list] = {"zpcid": [], "builtin": []}
        for i in range(runs):
            for side, boot in (("zpcid", boot_zpcid), ("builtin", boot_builtin)):
                path = make_disk(directory)
                try:
                    fig = await boot(qemu, script, path, cache)
                finally:
                    os.unlink(path)
                samples[side].append(fig)
                print(f"  cache={cache} run {i + 1}/{runs} {side:8} "
                      + " ".join(f"{k}={v:.2f}" for k, v in fig.items()), flush=True)
        out[cache] = samples
    return out


def report_guest(results: dict) -> dict:
    summary: dict = {}
    for cache, samples in results.items():
        print(f"\nx86_64 guest, cache={cache}: MB/s min / median / max "
              f"({len(samples['zpcid'])} interleaved runs each)")
        print(f"  {'test':14} {'zpcid':>24} {'built-in':>24} {'zpcid/built-in':>22}")
        summary[cache] = {}
        for name, _, _ in TESTS:
            z = [s[name] for s in samples["zpcid"]]
            b = [s[name] for s in samples["builtin"]]
            r = [zz / bb for zz, bb in zip(z, b)]
            summary[cache][name] = {"zpcid": spread(z), "builtin": spread(b), "ratio": spread(r)}
            print(f"  {name:14} {fmt(spread(z)):>24} {fmt(spread(b)):>24} {fmt(spread(r), 2):>22}")
    return summary


async def reference_runs(runs: int, duration: float, directory: str | None) -> dict:
    """The reference client's 4 KiB random-read IOPS against a pread loop, interleaved."""
    res = await virtio_bench.run_randread_pairs(runs=runs, duration=duration, directory=directory)
    b = res["baseline"]
    print(f"\nreference client, 4 KiB random reads, depth {res['depth']}, file on {res['where']}, "
          f"{runs} interleaved runs: IOPS min / median / max")
    print(f"  os.pread loop {fmt(spread(b), 0)}")
    out: dict = {"pread": spread(b), "samples": res}
    for key, label in (("virtio", f"{res['depth']} tasks"), ("virtio_batch", f"batches of {res['depth']}")):
        z = res.get(key) or []
        if not z:
            continue
        r = [zz / bb for zz, bb in zip(z, b)]
        print(f"  zpcid virtio-blk, {label:14} {fmt(spread(z), 0)}   ratio {fmt(spread(r), 3)}")
        out[key] = {"zpcid": spread(z), "ratio": spread(r)}
    out.update(zpcid=out["virtio"]["zpcid"], ratio=out["virtio"]["ratio"])  # (the earlier keys)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="guest boots per side and cache mode")
    ap.add_argument("--cache", default="none,writeback", help="comma-separated cache modes")
    ap.add_argument("--ref-runs", type=int, default=5, help="interleaved reference-client runs (0: skip)")
    ap.add_argument("--ref-duration", type=float, default=2.0)
    ap.add_argument("--no-guest", action="store_true", help="only the reference-client figure")
    ap.add_argument("--dir", default="/var/tmp", help="where the disk images live")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--aio", help="zpcid's aio engine (io_uring, threads; default: the function's)")
    args = ap.parse_args()
    AIO["aio"] = args.aio
    log.configure(fmt="json", level="warning")
    qemu = qh.find_qemu()
    out: dict = {}

    async def run() -> None:
        if not args.no_guest:
            if qemu is None:
                sys.exit(qh.missing_reason())
            print(f"{qemu.version_string}; kernel {qemu['x86_64'].kernel_version}; TCG, 1 vCPU", flush=True)
            raw = await guest_runs(qemu, args.cache.split(","), args.runs, args.dir)
            out["guest"] = {"samples": raw, "summary": report_guest(raw)}
        if args.ref_runs:
            out["reference"] = await reference_runs(args.ref_runs, args.ref_duration, args.dir)

    trio.run(run)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
