"""Per-layer snapshots: snapshot -> restore into a fresh object -> identical
snapshot and identical behaviour (real memfds and eventfds; whole functions
through the reference client over a real socket)."""

import os
import struct

import pytest
import trio
from hypothesis import given, settings, strategies as st

from protocol.vfio_user import consts as C
from protocol.vfio_user.messages import IrqSet
from zpcid import snapshot as S
from zpcid.devices import dma_engine as D
from zpcid.vmm.dma_engine_driver import Driver
from zpcid.devices import memory as Mem
from zpcid.pci.config import Bar, ConfigSpace
from zpcid.pci.msix import Msix
from zpcid.vfio_user.dma import DmaError, DmaSpace
from zpcid.vfio_user.irq import IrqTable
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.regions import MemfdRegion, WindowedRegion
from zpcid.vmm import client as vclient
from helpers import prepare_vmm, serving

PAGE = 4096
MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX


def through_bytes(snap):
    """What a hand-over does: JSON bytes plus duplicated fds, decoded again."""
    copy = S.dup_fds(snap)
    blob, fds = S.dumps(copy)
    return S.loads(blob, fds)


def closed(fd):
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


# ----------------------------------------------------------------- config space
def make_config():
    cfg = ConfigSpace(0x1014, 0xFE00, 0x050000)
    cfg.add_pcie_capability()
    cfg.add_bar(Bar(0, WindowedRegion(0x1000)))
    cfg.add_bar(Bar(2, WindowedRegion(0x4000), prefetch=True))
    cfg.add_bar(Bar(5, WindowedRegion(0x100), is64=False))
    return cfg


writes = st.lists(st.tuples(st.integers(0, 0xFF), st.binary(min_size=1, max_size=8)), max_size=30)


@given(before=writes, after=writes)
def test_config_space_round_trip(before, after):
    old = make_config()
    for off, data in before:
        old.write(off, data)
    snap = old.snapshot()
    new = make_config()
    new.restore(through_bytes(snap))
    assert S.same(new.snapshot(), snap)
    for off, data in after:  # the same writes behave the same afterwards
        old.write(off, data)
        new.write(off, data)
        assert new.read(0, 256) == old.read(0, 256)
    new.reset(), old.reset()
    assert new.read(0, 4096) == old.read(0, 4096)


def test_config_snapshot_of_another_layout_is_refused():
    cfg = make_config()
    other = ConfigSpace(1, 2)
    other.add_bar(Bar(0, WindowedRegion(0x1000), is64=False))
    with pytest.raises(S.SnapshotError, match="BAR0"):
        cfg.restore(other.snapshot())
    with pytest.raises(S.SnapshotVersionError):
        cfg.restore(type(cfg.snapshot())(data=bytes(4096), bar_regs=(0,) * 6, version=99))


# ----------------------------------------------------------------- IRQs and MSI-X
def eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def make_msix():
    cfg = ConfigSpace(0x1014, 0xFE00)
    irqs = IrqTable({MSIX: 8, C.VFIO_PCI_ERR_IRQ_INDEX: 1}, maskable=frozenset({MSIX}))
    msix = Msix(cfg, irqs, 8, 2, 0, 0x2000)
    cfg.write(msix.cap + 2, struct.pack("<H", 0x8000))  # enable
    return cfg, irqs, msix


def drain(fds):
    return [vclient.read_eventfd(fd) for fd in fds]


ops = st.lists(st.one_of(
    st.tuples(st.just("fire"), st.integers(0, 7)),
    st.tuples(st.just("mask"), st.integers(0, 7)),
    st.tuples(st.just("unmask"), st.integers(0, 7)),
    st.tuples(st.just("entry"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("fnmask"), st.booleans()),
), max_size=25)


def apply(cfg, irqs, msix, op):
    kind = op[0]
    if kind == "fire":
        msix.fire(op[1])
    elif kind in ("mask", "unmask"):
        act = C.VFIO_IRQ_SET_ACTION_MASK if kind == "mask" else C.VFIO_IRQ_SET_ACTION_UNMASK
        irqs.apply(IrqSet(20, C.VFIO_IRQ_SET_DATA_NONE | act, MSIX, op[1], 1), [])
    elif kind == "entry":
        trio.run(msix.table_write, op[1] * 16 + 12, struct.pack("<I", int(op[2])))
    else:
        cfg.write(msix.cap + 2, struct.pack("<H", 0x8000 | (0x4000 if op[1] else 0)))


@settings(max_examples=40, deadline=None)
@given(before=ops, after=ops, installed=st.lists(st.booleans(), min_size=8, max_size=8))
def test_irq_table_and_msix_round_trip(before, after, installed):
    cfg, irqs, msix = make_msix()
    fds = [eventfd() if on else None for on in installed]
    try:
        for v, fd in enumerate(fds):
            if fd is not None:
                irqs.apply(IrqSet(20, C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER,
                                  MSIX, v, 1), [os.dup(fd)])
        for op in before:
            apply(cfg, irqs, msix, op)
        live = [fd for fd in fds if fd is not None]
        drain(live)
        snaps = (cfg.snapshot(), irqs.snapshot(), msix.snapshot())
        ncfg, nirqs, nmsix = make_msix()
        ncfg.restore(through_bytes(snaps[0]))
        nirqs.restore(through_bytes(snaps[1]))
        nmsix.restore(through_bytes(snaps[2]))
        assert drain(live) == [0] * len(live)  # restoring delivers nothing
        assert all(S.same(a, b) for a, b in zip((ncfg.snapshot(), nirqs.snapshot(), nmsix.snapshot()), snaps))
        for op in after:  # old and new deliver to the same eventfds in the same way
            apply(cfg, irqs, msix, op)
            got_old = drain(live)
            apply(ncfg, nirqs, nmsix, op)
            assert drain(live) == got_old
            assert nmsix.pending == msix.pending
        nirqs.clear()
    finally:
        irqs.clear()
        for fd in fds:
            if fd is not None:
                os.close(fd)


def test_irq_restore_into_other_counts_is_refused_and_closes_fds():
    irqs = IrqTable({MSIX: 2})
    fd = eventfd()
    irqs.apply(IrqSet(20, C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER, MSIX, 0, 1), [fd])
    copy = S.dup_fds(irqs.snapshot())
    with pytest.raises(S.SnapshotError, match="counts"):
        IrqTable({MSIX: 4}).restore(copy)
    assert all(closed(fd) for fd in copy.all_fds())
    irqs.clear()


# ----------------------------------------------------------------- DMA space
maps = st.lists(st.tuples(st.integers(0, 63), st.integers(1, 4), st.integers(0, 60), st.booleans(),
                          st.booleans()), max_size=12)


@settings(max_examples=40, deadline=None)
@given(spec=maps)
def test_dma_space_round_trip(spec):
    mem = Memfd(64 * PAGE)
    other = Memfd(8 * PAGE)
    old = DmaSpace()
    try:
        for page, npages, off, writable, message in spec:
            src = mem if off % 2 else other
            fd = None if message else src.fd
            offset = (off % (src.size // PAGE - npages + 1)) * PAGE if fd is not None else 0
            try:
                old.add(page * PAGE * 2, npages * PAGE, True, writable, fd, offset)
            except DmaError:
                pass
        mem.write(0, os.urandom(64 * PAGE))
        snap = old.snapshot()
        new = DmaSpace()
        new.restore(through_bytes(snap))
        assert S.same(new.snapshot(), snap)
        assert new.file_count == old.file_count
        for r in old.regions:
            if r.file is not None:
                assert trio.run(new.read, r.iova, r.size) == trio.run(old.read, r.iova, r.size)
                if r.writable:  # writes through the copy land in the same file
                    trio.run(new.write, r.iova, b"\xa5" * 8)
                    assert trio.run(old.read, r.iova, 8) == b"\xa5" * 8
        new.close()
    finally:
        old.close()
        mem.close()
        other.close()


def test_dma_restore_into_a_used_space_is_refused_and_closes_fds():
    mem = Memfd(4 * PAGE)
    space = DmaSpace()
    space.add(0, PAGE, True, True, mem.fd, 0)
    copy = S.dup_fds(space.snapshot())
    with pytest.raises(S.SnapshotError, match="not empty"):
        space.restore(copy)
    assert all(closed(fd) for fd in copy.all_fds())
    space.close()
    mem.close()


# ----------------------------------------------------------------- memfd BAR
def test_memfd_region_restore_serves_the_same_file():
    old = MemfdRegion(4 * PAGE)
    trio.run(old.write, 100, b"hello")
    snap = old.snapshot()
    new = MemfdRegion(4 * PAGE)
    new.restore(through_bytes(snap))
    assert S.same(new.snapshot(), snap) and trio.run(new.read, 100, 5) == b"hello"
    trio.run(new.write, 200, b"there")
    assert trio.run(old.read, 200, 5) == b"there"
    with pytest.raises(S.SnapshotError, match="restored into"):
        MemfdRegion(PAGE).restore(S.dup_fds(snap))
    new.close()
    old.close()


# ----------------------------------------------------------------- whole functions
async def restored_copy(function, factory):
    snap = function.snapshot()
    fresh = factory()
    fresh.restore(through_bytes(snap))
    assert S.same(fresh.snapshot(), snap)
    return fresh, snap


async def test_memory_function_round_trip_through_a_real_socket(sock_dir):
    mem = Memfd(1 << 20)
    make = lambda: Mem.MemoryFunction("m0", ram_size=64 * PAGE)  # noqa: E731
    try:
        async with serving(make(), sock_dir, "old.sock") as old_srv:
            async with vclient.connect(old_srv.path) as c1:
                fds = await prepare_vmm(c1, mem)
                await c1.region_write(0, 0x123, b"bar0 content", via_mmap=False)
                await c1.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0xC0FFEE))
                await c1.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", 2))
                assert await vclient.wait_eventfd(fds[2]) == 1
                # mask vector 1 at the protocol level, fire it: pending in the PBA
                await c1.set_irqs(MSIX, 1, 1, C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_MASK)
                await c1.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", 1))
                fresh, snap = await restored_copy(old_srv.function, make)
                cfg_old = await c1.region_read(7, 0, 4096)
                regs_old = await c1.region_read(4, 0, 0x40)
                async with serving(fresh, sock_dir, "new.sock") as new_srv:
                    async with vclient.connect(new_srv.path) as c2:
                        assert await c2.region_read(7, 0, 4096) == cfg_old
                        assert await c2.region_read(4, 0, 0x40) == regs_old
                        assert await c2.region_read(0, 0x123, 12, via_mmap=False) == b"bar0 content"
                        pba = await c2.region_read(2, 0x2000, 8)
                        assert pba[0] == 0b10
                        # the restored function signals the first client's eventfds
                        await c2.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", 3))
                        assert await vclient.wait_eventfd(fds[3]) == 1
                        # and DMAs into the first client's guest memory
                        mem.write(0x8000, b"guest data")
                        await c2.region_write(4, Mem.REG_DMA_ADDR, struct.pack("<QI", 0x8000, 10))
                        await c2.region_write(4, Mem.REG_DMA_CMD, struct.pack("<I", Mem.DMA_CMD_FROM_HOST))
                        with trio.fail_after(5):
                            while (await c2.region_read(4, Mem.REG_DMA_STATUS, 4))[0] == Mem.DMA_STATUS_BUSY:
                                await trio.sleep(0.001)
                        assert await c2.region_read(0, 0, 10, via_mmap=False) == b"guest data"
                        # BAR0 is the same memory for both processes' views
                        assert await c1.region_read(0, 0, 10, via_mmap=False) == b"guest data"
                for fd in fds:
                    os.close(fd)
    finally:
        mem.close()


async def test_dma_engine_ring_continues_after_restore(sock_dir):
    mem = Memfd(1 << 20)
    make = lambda: D.DmaEngine("d0")  # noqa: E731
    ring, size = 0x1000, 8

    def put(idx, src, dst, data):
        mem.write(src, data)
        mem.write(ring + (idx % size) * D.DESC_SIZE,
                  D.DESC.pack(D.OP_COPY, D.DESC_F_IRQ, len(data), src, dst, 0, 0))

    try:
        async with serving(make(), sock_dir, "old.sock") as old_srv:
            async with vclient.connect(old_srv.path) as c1:
                fds = await prepare_vmm(c1, mem)
                await c1.region_write(0, D.REG_RING_BASE, struct.pack("<QI", ring, size))
                await c1.region_write(0, D.REG_VECTOR, struct.pack("<I", 1))
                for i in range(6):
                    put(i, 0x10000 + i * PAGE, 0x40000 + i * PAGE, os.urandom(PAGE))
                assert D.status_error(await Driver(c1).submit(6)) == 0
                assert await vclient.wait_eventfd(fds[1]) == 1
                fresh, snap = await restored_copy(old_srv.function, make)
                async with serving(fresh, sock_dir, "new.sock") as new_srv:
                    async with vclient.connect(new_srv.path) as c2:
                        assert await c2.region_read(0, D.REG_RING_HEAD, 4) == struct.pack("<I", 6)
                        expected = {}
                        for i in range(6, 11):  # wraps the ring of 8
                            data = os.urandom(PAGE)
                            put(i, 0x10000 + i * PAGE, 0x40000 + i * PAGE, data)
                            expected[0x40000 + i * PAGE] = data
                        assert D.status_error(await Driver(c2).submit(11)) == 0
                        assert await vclient.wait_eventfd(fds[1]) == 1
                        assert struct.unpack("<I", await c2.region_read(0, D.REG_COMPLETED, 4))[0] == 11
                        for dst, data in expected.items():
                            assert mem.read(dst, PAGE) == data
                for fd in fds:
                    os.close(fd)
    finally:
        mem.close()


async def test_function_snapshot_of_another_type_is_refused_and_fds_closed(sock_dir):
    mem = Memfd(1 << 20)
    try:
        async with serving(Mem.MemoryFunction("m0"), sock_dir) as srv:
            async with vclient.connect(srv.path) as c:
                fds = await prepare_vmm(c, mem)
                copy = S.dup_fds(srv.function.snapshot())
                assert copy.all_fds()  # DMA file, eventfds, BAR memfd
                fresh = D.DmaEngine("m0")
                with pytest.raises(S.SnapshotError, match="memory function"):
                    fresh.restore(copy)
                assert all(closed(fd) for fd in copy.all_fds())
                fresh.close()
                for fd in fds:
                    os.close(fd)
    finally:
        mem.close()
