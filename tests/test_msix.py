"""MSI-X and the IRQ table: eventfd delivery, masking, pending bits, SET_IRQS rules."""

import errno
import os
import struct

import pytest

from protocol.vfio_user import consts as C
from protocol.vfio_user.messages import IrqSet
from zpcid.vmm.client import read_eventfd
from zpcid.vfio_user.irq import IrqError, IrqTable
from zpcid.pci.msix import Msix
from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, ConfigSpace

MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX
EVENTFD_TRIGGER = C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER


class Rig:
    """ConfigSpace + IrqTable + Msix wired like a function, with real eventfds."""

    def __init__(self, nvec=4):
        self.cfg = ConfigSpace(0x1014, 0xFE00)
        self.irqs = IrqTable({MSIX: nvec, C.VFIO_PCI_ERR_IRQ_INDEX: 1},
                             maskable=frozenset({MSIX}))
        self.msix = Msix(self.cfg, self.irqs, nvec, bar=2, table_offset=0, pba_offset=0x2000)
        self.efds = []

    def install(self, start, count):
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        # The table owns what it is given; keep our own duplicates to read from.
        mine = [os.dup(fd) for fd in fds]
        self.efds += mine
        assert self.irqs.apply(IrqSet(20, EVENTFD_TRIGGER, MSIX, start, count), fds) == []
        return mine

    def control(self, value):
        self.cfg.write(self.msix.cap + 2, struct.pack("<H", value))

    def set(self, flags, start, count, data=b"", fds=(), index=MSIX):
        return self.irqs.apply(IrqSet(20 + len(data), flags, index, start, count, data), list(fds))

    def close(self):
        self.irqs.clear()
        for fd in self.efds:
            os.close(fd)


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_capability_layout():
    r = Rig(nvec=70)
    try:
        cap = r.cfg.caps[PCI_CAP_ID_MSIX]
        ctl, table, pba = struct.unpack_from("<HII", r.cfg.read(cap + 2, 10))
        assert ctl == 69 and table == 2 and pba == 0x2000 | 2
        assert r.msix.table_size == 70 * 16 and r.msix.pba_size == 16
    finally:
        r.close()
    with pytest.raises(ValueError):
        Rig(nvec=0)
    with pytest.raises(ValueError):
        Rig(nvec=2049)


def test_disabled_msix_drops_vectors(rig):
    (e0,) = rig.install(0, 1)
    assert rig.msix.fire(0) is False
    assert read_eventfd(e0) == 0 and not rig.msix.is_pending(0)
    with pytest.raises(ValueError):
        rig.msix.fire(4)


def test_delivery_and_pending_without_eventfd(rig):
    rig.control(PCI_MSIX_FLAGS_ENABLE)
    assert rig.msix.fire(2) is False and rig.msix.is_pending(2)  # no eventfd yet
    fds = rig.install(0, 4)  # installing flushes what is pending
    assert [read_eventfd(fd) for fd in fds] == [0, 0, 1, 0] and not rig.msix.is_pending(2)
    assert rig.msix.fire(3) is True and read_eventfd(fds[3]) == 1
    assert rig.msix.delivered == 2


def test_protocol_mask_unmask(rig):
    fds = rig.install(0, 4)
    rig.control(PCI_MSIX_FLAGS_ENABLE)
    rig.set(C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_MASK, 1, 2)
    for v in range(4):
        rig.msix.fire(v)
    assert [read_eventfd(fd) for fd in fds] == [1, 0, 0, 1]
    assert rig.msix.pending[0] == 0b0110
    rig.set(C.VFIO_IRQ_SET_DATA_BOOL | C.VFIO_IRQ_SET_ACTION_UNMASK, 1, 2, b"\0\1")
    assert [read_eventfd(fd) for fd in fds] == [0, 0, 1, 0] and rig.msix.pending[0] == 0b0010
    rig.set(C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_UNMASK, 0, 4)
    assert read_eventfd(fds[1]) == 1 and not any(rig.msix.pending)


def test_function_mask(rig):
    fds = rig.install(0, 4)
    rig.control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    rig.msix.fire(0)
    assert read_eventfd(fds[0]) == 0 and rig.msix.is_pending(0)
    rig.control(PCI_MSIX_FLAGS_ENABLE)
    assert read_eventfd(fds[0]) == 1


async def test_table_mask_bits_count_once_written(rig):
    fds = rig.install(0, 4)
    rig.control(PCI_MSIX_FLAGS_ENABLE)
    # QEMU never writes the table: its reset mask bits must not block delivery.
    assert rig.msix.fire(0) and read_eventfd(fds[0]) == 1
    await rig.msix.table_write(0, struct.pack("<QII", 0xFEE00000, 0, 0))
    assert rig.msix.fire(0) and not rig.msix.fire(1)
    assert await rig.msix.pba_read(0, 8) == b"\x02" + bytes(7)
    await rig.msix.table_write(16 + 12, b"\0\0\0\0")
    assert read_eventfd(fds[1]) == 1


def test_deliver_hook_can_take_over(rig):
    fds = rig.install(0, 4)
    rig.control(PCI_MSIX_FLAGS_ENABLE)
    seen = []
    rig.msix.deliver_hook = lambda v: seen.append(v) or v == 1
    rig.msix.fire(0)
    rig.msix.fire(1)
    assert seen == [0, 1] and [read_eventfd(fd) for fd in fds] == [0, 1, 0, 0]


def test_reset_clears_state(rig):
    rig.install(0, 4)
    rig.control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
    rig.msix.fire(3)
    rig.msix.reset()
    assert not rig.msix.enabled and not rig.msix.function_masked and not any(rig.msix.pending)


def test_eventfd_reassign_and_deassign_close_the_old_descriptor(rig):
    rig.install(0, 2)
    old = rig.irqs.eventfd(MSIX, 0)
    rig.install(0, 1)
    with pytest.raises(OSError):
        os.fstat(old)  # replaced: closed by the table
    rig.set(EVENTFD_TRIGGER, 0, 2)  # no fds: de-assign
    assert rig.irqs.installed() == 0


def test_set_irqs_rules(rig):
    # Disable-all is accepted on any index, even one with no vectors (QEMU ignores errors there).
    for index in range(C.VFIO_PCI_NUM_IRQS):
        rig.set(C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0, index=index)
    cases = [
        (dict(flags=C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER, start=1, count=0), errno.EINVAL),
        (dict(flags=EVENTFD_TRIGGER, start=3, count=2), errno.EINVAL),
        (dict(flags=C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_MASK, start=0, count=1,
              index=C.VFIO_PCI_ERR_IRQ_INDEX), errno.EINVAL),
        (dict(flags=C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_UNMASK, start=0, count=1),
         errno.ENOTSUP),
        (dict(flags=C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER, start=0, count=1,
              index=7), errno.EINVAL),
    ]
    for kw, err in cases:
        with pytest.raises(IrqError) as ei:
            rig.set(**kw)
        assert ei.value.errno == err
    with pytest.raises(IrqError):
        rig.irqs.info(5)
    assert rig.irqs.info(MSIX) == (C.VFIO_IRQ_INFO_EVENTFD | C.VFIO_IRQ_INFO_MASKABLE, 4)
    assert rig.irqs.info(C.VFIO_PCI_INTX_IRQ_INDEX) == (C.VFIO_IRQ_INFO_EVENTFD, 0)


def test_err_index_signal(rig):
    e = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    mine = os.dup(e)
    rig.efds.append(mine)
    rig.set(EVENTFD_TRIGGER, 0, 1, fds=[e], index=C.VFIO_PCI_ERR_IRQ_INDEX)
    assert rig.irqs.signal(C.VFIO_PCI_ERR_IRQ_INDEX) is True
    assert read_eventfd(mine) == 1
    assert rig.irqs.signal(C.VFIO_PCI_REQ_IRQ_INDEX) is False  # nothing installed
