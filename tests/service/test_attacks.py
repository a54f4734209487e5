"""Issue 12's attack table, one test per row, against the real daemon (a subprocess).

After each attack: the daemon is alive, the other functions answer, and the
attacked function has recovered (a new VMM attaches) or refused cleanly.
docs/reliability.md lists the rows and what each test shows.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest
import trio

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.header import Command
from zpcid.devices.memory import REG_DOORBELL, REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_STATUS, REG_MAGIC, MAGIC
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.transport import close_fds
from zpcid.vmm import client as zclient

from .conftest import memfn

GENEROUS = 20.0  # seconds: a bound only a frozen daemon misses
ZPCI_REGION = 9
BAR0, BAR4 = 0, 4
MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX


async def assert_answers(path: str) -> None:
    """A fresh VMM attaches to ``path`` and reads the function's magic register."""
    with trio.fail_after(GENEROUS):
        async with zclient.connect(path) as c:
            magic, = struct.unpack("<I", await c.region_read(BAR4, REG_MAGIC, 4))
            assert magic == MAGIC


async def assert_healthy(d, *names: str) -> None:
    assert d.proc.poll() is None, f"daemon died ({d.proc.returncode}):\n{d.log()[-3000:]}"
    for name in names:
        await assert_answers(d.socket(name))
    assert d.proc.poll() is None


async def region_fd(c, index: int) -> int:
    """The descriptor the daemon sends with REGION_INFO (as QEMU receives it)."""
    reply = await c.request(Command.DEVICE_GET_REGION_INFO, M.RegionInfo(argsz=32, index=index).pack_request())
    info = M.RegionInfo.unpack_reply(reply.payload)
    fds = list(reply.fds)
    if info.argsz > 32:
        close_fds(fds)
        reply = await c.request(Command.DEVICE_GET_REGION_INFO,
                                M.RegionInfo(argsz=info.argsz, index=index).pack_request())
        fds = list(reply.fds)
    assert len(fds) == 1
    return fds[0]


def two_memory_functions(daemons, **kw):
    return daemons(functions=[memfn(1, **kw), memfn(2)]).start()


# ---------------------------------------------------------------------- row 1
@pytest.mark.parametrize("index", [ZPCI_REGION, BAR0])
async def test_row1_shared_memfd_cannot_be_truncated(daemons, index):
    d = two_memory_functions(daemons)
    async with zclient.connect(d.socket("f1")) as c:
        fd = await region_fd(c, index)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 1 << 30)
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL
        finally:
            os.close(fd)
        await c.region_read(index, 0, 8, via_mmap=False)
    await assert_healthy(d, "f1", "f2")


async def test_row1_truncated_backing_file_reads_as_zeros(daemons, sock_dir):
    backing = os.path.join(sock_dir, "bar0.img")
    d = two_memory_functions(daemons, backing=backing)
    async with zclient.connect(d.socket("f1")) as c:
        await c.region_write(BAR0, 0x100, b"persist", via_mmap=False)
        fd = await region_fd(c, BAR0)
        try:
            os.ftruncate(fd, 0)  # a file cannot be sealed: the client may do this...
        finally:
            os.close(fd)
        # ...and the daemon, which never mapped it, reads zeros instead of dying.
        assert await c.region_read(BAR0, 0x100, 7, via_mmap=False) == bytes(7)
        await c.region_write(BAR0, 0x100, b"x", via_mmap=False)
        assert os.path.getsize(backing) == 0  # a write does not grow it back
    await assert_healthy(d, "f1", "f2")


# ---------------------------------------------------------------------- row 2
async def bar_dma(c, addr: int, cmd: int) -> int:
    """Memory function: DMA between BAR0 and ``addr``; the resulting DMA_STATUS."""
    await c.region_write(BAR4, REG_DMA_ADDR, struct.pack("<QI", addr, 4096), via_mmap=False)
    await c.region_write(BAR4, REG_DMA_CMD, struct.pack("<I", cmd), via_mmap=False)
    with trio.fail_after(GENEROUS):
        while True:
            status, = struct.unpack("<I", await c.region_read(BAR4, REG_DMA_STATUS, 4, via_mmap=False))
            if status != 2:
                return status
            await trio.sleep(0.01)


@pytest.mark.parametrize("sealed", [False, True])
async def test_row2_truncated_dma_memfd_is_a_dma_fault(daemons, sealed):
    d = two_memory_functions(daemons)
    # Unsealed: like memory-backend-memfd,seal=off or a file on /dev/shm.
    seal = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW if sealed else 0
    fd = os.memfd_create("zpcid-test-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
        os.pwrite(fd, b"guest data", 0x2000)
        async with zclient.connect(d.socket("f1")) as c:
            await c.region_write(7, 4, struct.pack("<H", 0x6))  # bus master
            await c.dma_map(0x100000, 1 << 20, fd, 0)
            assert await bar_dma(c, 0x102000, 2) == 0  # guest -> BAR0 works
            assert await c.region_read(BAR0, 0, 10, via_mmap=False) == b"guest data"
            if sealed:
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, 0)
            else:
                os.ftruncate(fd, 0)
                assert await bar_dma(c, 0x102000, 2) == 1  # fault, not SIGBUS
                assert await bar_dma(c, 0x102000, 1) == 1
            # The doorbell of the attack: an MSI-X vector with nothing installed.
            await c.region_write(BAR4, REG_DOORBELL, struct.pack("<I", 0), via_mmap=False)
    finally:
        os.close(fd)
    await assert_healthy(d, "f1", "f2")


# ---------------------------------------------------------------------- row 3
def not_eventfds(tmp: str):
    r, w = os.pipe()
    a, b = __import__("socket").socketpair()
    f = os.open(os.path.join(tmp, "file"), os.O_RDWR | os.O_CREAT, 0o600)
    dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    return {"pipe": w, "socket": a.detach(), "file": f, "directory": dfd}, [r, b.detach()]


async def test_row3_set_irqs_takes_only_eventfds(daemons, sock_dir):
    d = two_memory_functions(daemons)
    fds, others = not_eventfds(sock_dir)
    try:
        async with zclient.connect(d.socket("f1")) as c:
            for kind, fd in fds.items():
                for index in (MSIX, C.VFIO_PCI_ERR_IRQ_INDEX):
                    with pytest.raises(zclient.VfioUserError) as exc:
                        await c.set_irqs(index, 0, 1, C.VFIO_IRQ_SET_DATA_EVENTFD
                                         | C.VFIO_IRQ_SET_ACTION_TRIGGER, [fd])
                    assert exc.value.errno == errno.EINVAL, kind
            ev = await c.enable_irq_eventfds(MSIX, 1)
            os.close(ev[0])
    finally:
        close_fds(list(fds.values()) + others)
    log = d.log()
    assert "SET_IRQS needs eventfds; got a pipe" in log and "got a socket" in log
    await assert_healthy(d, "f1", "f2")


async def test_row3_saturated_blocking_eventfd_does_not_stall(daemons):
    d = two_memory_functions(daemons)
    ev = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as an attacker would leave it
    try:
        os.eventfd_write(ev, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        async with zclient.connect(d.socket("f1")) as c:
            await c.set_irqs(MSIX, 0, 1, C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER, [ev])
            cfg = await c.region_read(7, 0, 256)
            from zpcid.vmm.model import find_capability
            from zpcid.pci.config import PCI_CAP_ID_MSIX
            msix = find_capability(cfg, PCI_CAP_ID_MSIX)
            await c.region_write(7, msix + 2, struct.pack("<H", 0x8000))  # MSI-X enable
            for _ in range(3):
                await c.region_write(BAR4, REG_DOORBELL, struct.pack("<I", 0), via_mmap=False)
            # Both functions (and this one) keep answering while the counter stays full.
            await assert_healthy(d, "f2")
            assert await c.region_read(BAR4, REG_MAGIC, 4, via_mmap=False) == struct.pack("<I", MAGIC)
        assert os.eventfd_read(ev) == 0xFFFF_FFFF_FFFF_FFFE
    finally:
        os.close(ev)
    await assert_healthy(d, "f1", "f2")


# ---------------------------------------------------------------------- row 5
def daemon_fds(d) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


async def test_row5_connection_flood_under_a_low_fd_limit(daemons):
    import resource
    import socket

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    d = daemons(functions=[memfn(1), memfn(2)])
    # The flood of the issue (1,015 connections under 1,024), scaled down.
    limit = 96
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        d.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    async with zclient.connect(d.socket("f1")) as legit:
        baseline = daemon_fds(d)
        flood = []
        try:
            for path in [d.socket("f1")] * (limit + 40) + [d.control] * 40:
                s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                flood.append(s)
                with trio.move_on_after(0.5):  # a full backlog: the daemon is not accepting
                    try:
                        await s.connect(path)
                    except OSError:
                        pass
            await trio.sleep(1)
            assert d.proc.poll() is None, d.log()[-3000:]
            # The attached VMM is untouched.
            assert await legit.region_read(BAR4, REG_MAGIC, 4, via_mmap=False) == struct.pack("<I", MAGIC)
        finally:
            for s in flood:
                s.close()
    # Both sockets and the control socket still serve; descriptors went back.
    with trio.fail_after(GENEROUS):
        while True:
            try:
                await assert_healthy(d, "f1", "f2")
                rc, out, err = d.ctl("list")
                if rc == 0:
                    break
            except (OSError, AssertionError, zclient.VfioUserError):
                pass
            await trio.sleep(0.2)
    with trio.fail_after(GENEROUS):
        while daemon_fds(d) > baseline:
            await trio.sleep(0.1)
    assert "function_failed" not in d.log()


# ---------------------------------------------------------------------- rows 4 and 7
async def probes_while(probe, busy) -> int:
    """How often ``probe()`` completes while ``busy()`` runs.

    The probe is served by the attacked function's own worker loop (``zpcictl
    show`` goes there over the supervisor's channel): a loop held for the whole
    attack answers none of them until the work is done.
    """
    n = 0
    done = trio.Event()

    async def watch():
        await busy()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        with trio.fail_after(GENEROUS * 3):
            while not done.is_set():
                await probe()
                n += 1
    return n


def show_probe(d, fid: int):
    async def probe():
        info = await trio.to_thread.run_sync(d.ctl_json, "show", hex(fid))
        assert info["attached"]
    return probe


async def test_row4_huge_dma_engine_ring_does_not_hold_the_loop(daemons):
    from zpcid.devices import dma_engine as de

    d = daemons(functions=[{"type": "dma-engine", "fid": 1, "uid": 1, "name": "f1"}, memfn(2)]).start()
    mem_size, ring = 64 << 20, (64 << 20) - 4096
    with Memfd(mem_size, "zpcid-test-guest") as mem:
        descs = b"".join(de.DESC.pack(de.OP_CRC32C, 0, 64 << 20, 0, 0, 0, 0) for _ in range(16))
        mem.write(ring, descs)
        async with zclient.connect(d.socket("f1")) as a:
            await a.region_write(7, 4, struct.pack("<H", 0x6))  # bus master
            await a.dma_map(0, mem_size, mem.fd, 0)
            await a.region_write(0, de.REG_RING_BASE, struct.pack("<QII", ring, 16, 0), via_mmap=False)

            async def ring_runs():
                await a.region_write(0, de.REG_RING_TAIL, struct.pack("<I", 16), via_mmap=False)
                while True:
                    status, = struct.unpack("<I", await a.region_read(0, de.REG_STATUS, 4, via_mmap=False))
                    if not status & de.STATUS_BUSY:
                        assert de.status_error(status) == 0
                        return
                    await trio.sleep(0.005)

            n = await probes_while(show_probe(d, 1), ring_runs)
            completed, = struct.unpack("<I", await a.region_read(0, de.REG_COMPLETED, 4, via_mmap=False))
            assert completed == 16
    assert n >= 3, f"the function's loop answered {n} control requests while 1 GiB was CRC'd"
    await assert_healthy(d, "f2")


async def test_row7_pathological_rpcit_does_not_hold_the_loop(daemons):
    from zpcid.vmm import model

    # A DMA limit that covers a 64 GiB aperture (SDMA + limit pages).
    # The refresh bit on: every RPCIT walks its whole range into the shadow.
    d = daemons(functions=[memfn(1, **{"dma-limit": 1 << 24, "relaxed-translation": False,
                                       "tlb-refresh": True}),
                           memfn(2)]).start()
    sdma, size = 1 << 32, 64 << 30
    async with model.attach(d.socket("f1"), guest_memory=64 << 20) as vmm:
        t = vmm.tables(32 << 20, 16 << 20)
        # One valid page in each 1 MiB segment of the first 2 GiB ...
        for seg in range(2048):
            t.map(sdma + (seg << 20), 0x10000, 1)
        # ... and the other 31 region-third entries of the aperture share those tables.
        first = t.root + 8 * (sdma >> 31)
        rte = t.read_u64(first)
        for i in range(1, size >> 31):
            t.write_u64(first + 8 * i, rte)
        r = await vmm.register_translation(sdma, sdma + size - 1, t.iota)
        assert (r.cc, r.exception) == (0, 0)

        async def refresh():
            res = await vmm.box.rpcit(sdma, size)
            assert (res.result, res.cc) == (0, 0)

        n = await probes_while(show_probe(d, 1), refresh)
        assert d.ctl_json("show", "0x1")["zpci"]["shadow_mappings"] == 65536
    assert n >= 3, f"the function's loop answered {n} control requests during one RPCIT of 64 GiB"
    await assert_healthy(d, "f1", "f2")
