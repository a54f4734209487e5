"""virtio-blk through the real path: FunctionServer on a Unix socket, the reference
client as VMM, memfd (or message-mode) guest memory, tests/virtio_driver.py as guest."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest
import structlog
import trio

from helpers import serving
from virtio_driver import (NEEDS_RESET, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN,
                           T_OUT, T_WRITE_ZEROES, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                           VRING_DESC_F_WRITE, WAIT, DriverError, blk_guest, hdr, raw_chain,
                           wait_status)
from zpcid import snapshot as S
from zpcid.vmm import client as zclient
from zpcid.vmm.client import read_eventfd, wait_eventfd
from zpcid.devices import TYPES, load_all, uring
from zpcid.devices.virtio_blk import VirtioBlkFunction
from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR
from zpcid.devices.virtio import pci as vp
from zpcid.vmm.virtio_driver import GuestMemory, open_blk

MiB = 1 << 20
GUEST_MEM_SNAP = 16 * MiB


def pattern(seed: int, n: int) -> bytes:
    block = bytes((seed * 31 + i * 7) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def host_read(path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def disk(tmp_path):
    return str(tmp_path / "disk.img")


# ---------------------------------------------------------------------- identity


async def test_pci_identity_capabilities_and_config(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="4M", num_queues=3, queue_size=128,
                           serial="zpcid-serial")
    async with serving(fn, sock_dir) as server:
        async with zclient.connect(server.path) as c:
            cfg = await c.region_read(7, 0, 256)
            vendor, device = struct.unpack_from("<HH", cfg, 0)
            assert (vendor, device) == (0x1AF4, 0x1042)
            assert cfg[8] >= 1  # revision: non-transitional
            assert int.from_bytes(cfg[9:12], "little") == 0x010000
            assert struct.unpack_from("<HH", cfg, 0x2C) == (0x1AF4, 0x1100)
            # BAR0 (virtio structures) and BAR2 (MSI-X): 64-bit memory BARs, power-of-two sizes.
            for bar in (0, 2):
                assert cfg[0x10 + 4 * bar] & 0x7 == 0x4
                info = (await c.region_info(bar)).info
                assert info.size and info.size & (info.size - 1) == 0
            # Walk the capability list like a driver does.
            caps, ptr = {}, cfg[0x34]
            while ptr:
                if cfg[ptr] == PCI_CAP_ID_VNDR:
                    cap_len, cfg_type, bar, _, off, length = struct.unpack_from("<BBBBxxII", cfg, ptr + 2)
                    caps[cfg_type] = (bar, off, length, cap_len)
                elif cfg[ptr] == PCI_CAP_ID_MSIX:
                    msix = struct.unpack_from("<HII", cfg, ptr + 2)
                ptr = cfg[ptr + 1]
            assert set(caps) == {vp.VIRTIO_PCI_CAP_COMMON_CFG, vp.VIRTIO_PCI_CAP_NOTIFY_CFG,
                                 vp.VIRTIO_PCI_CAP_ISR_CFG, vp.VIRTIO_PCI_CAP_DEVICE_CFG}
            assert all(bar == 0 for bar, *_ in caps.values())
            assert caps[vp.VIRTIO_PCI_CAP_COMMON_CFG][2] >= 0x38  # Linux's minimum
            assert caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG][3] == 20  # notify cap carries the multiplier
            assert (msix[0] & 0x7FF) + 1 == 4  # config + 3 queues
            assert msix[1] & 7 == 2  # table in BAR2

    async with blk_guest(fn, sock_dir) as drv:
        f = drv.device_features
        for bit in (vp.VIRTIO_F_VERSION_1, 2, 6, 9, 12, 13, 14, vp.VIRTIO_RING_F_INDIRECT_DESC,
                    vp.VIRTIO_RING_F_EVENT_IDX, vp.VIRTIO_F_ACCESS_PLATFORM):
            assert f >> bit & 1, bit
        assert not f >> 5 & 1  # not read-only
        assert await drv.capacity() == 4 * MiB // 512
        assert await drv.device_config(0x0C, 4) == 126  # seg_max = queue size - 2
        assert await drv.device_config(0x14, 4) == 512
        assert await drv.device_config(0x22, 2) == 3
        assert [q.size for q in drv.queues] == [128, 128, 128]
        assert await drv.get_id() == b"zpcid-serial"
        d = fn.describe()
        assert d["type"] == "virtio-blk" and d["virtio"]["queues"] == [0, 1, 2]


async def test_registered_type_and_option_errors(disk, tmp_path):
    load_all()
    fn = TYPES["virtio-blk"]("vbr", path=disk, size="1M", readonly=False)
    try:
        assert os.path.getsize(disk) == MiB and fn.capacity == MiB
    finally:
        fn.close()
    with pytest.raises(ValueError):
        VirtioBlkFunction("x", path=str(tmp_path / "missing.img"))  # no size to create it
    with pytest.raises(ValueError):
        VirtioBlkFunction("x", path=disk, queue_size=100)
    with pytest.raises(ValueError):
        VirtioBlkFunction("x", path="/dev/full")  # no size for a character device
    with pytest.raises(ValueError, match="aio 'native' is not one of: io_uring, threads"):
        VirtioBlkFunction("x", path=disk, aio="native")


# ---------------------------------------------------------------------- data path


@pytest.mark.parametrize("shared,seal", [(True, None), (True, 0), (False, None)],
                         ids=["memfd", "memfd-unsealed", "dma-messages"])
async def test_write_flush_read_back_and_host_file(disk, sock_dir, shared, seal):
    # Unsealed guest memory is reached with pread/pwrite on the client's fd, not mmapped.
    fn = VirtioBlkFunction("vb0", path=disk, size="8M")
    data = pattern(1, 64 * 1024)
    async with blk_guest(fn, sock_dir, shared=shared, seal=seal) as drv:
        await drv.write(0, 100, data)
        assert await drv.flush(0) == S_OK
        assert await drv.read(0, 100, len(data)) == data
        assert await drv.read(0, 0, 512) == bytes(512)
        client = drv.client
        if shared:
            assert client.dma_requests == 0
        else:
            assert client.dma_requests > 0  # everything went through DMA_READ/DMA_WRITE
    assert host_read(disk, 100 * 512, len(data)) == data
    assert fn.stats["flushes"] == 1 and not fn.dirty
    fn.close()


async def test_large_requests_span_io_chunks_with_indirect_descriptors(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="16M")
    data = pattern(2, 3 * MiB + 4096)  # more than the 1 MiB the device stages at a time
    async with blk_guest(fn, sock_dir) as drv:
        status, _, used = await drv.request(0, T_OUT, 8, out=data, indirect=True)
        assert (status, used) == (S_OK, 1)
        status, back, used = await drv.request(0, T_IN, 8, in_len=len(data), indirect=True)
        assert status == S_OK and back == data and used == len(data) + 1
    assert host_read(disk, 8 * 512, len(data)) == data
    fn.close()


async def test_multiple_queues_concurrently(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", num_queues=4)
    async with blk_guest(fn, sock_dir) as drv:
        assert len(drv.queues) == 4

        async def worker(q):
            for i in range(8):
                sector = (q * 64 + i * 8)
                await drv.write(q, sector, pattern(q * 8 + i, 4096))
            for i in range(8):
                assert await drv.read(q, q * 64 + i * 8, 4096) == pattern(q * 8 + i, 4096)

        async with trio.open_nursery() as n:
            for q in range(4):
                n.start_soon(worker, q)
        assert all(q.interrupts > 0 for q in drv.queues)  # each queue raised its own vector
    for q in range(4):
        for i in range(8):
            assert host_read(disk, (q * 64 + i * 8) * 512, 4096) == pattern(q * 8 + i, 4096)
    fn.close()


async def test_many_requests_in_flight_on_one_queue(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", queue_size=64, io_threads=4)
    async with blk_guest(fn, sock_dir) as drv:
        async with trio.open_nursery() as n:
            for i in range(100):  # more than the queue holds: the driver waits for descriptors
                n.start_soon(drv.write, 0, i * 8, pattern(i, 4096))
        results = {}
        async with trio.open_nursery() as n:
            async def rd(i):
                results[i] = await drv.read(0, i * 8, 4096)
            for i in range(100):
                n.start_soon(rd, i)
        assert all(results[i] == pattern(i, 4096) for i in range(100))
    fn.close()


@pytest.mark.parametrize("wanted", [~((1 << vp.VIRTIO_RING_F_EVENT_IDX) | (1 << vp.VIRTIO_RING_F_INDIRECT_DESC)),
                                    1 << vp.VIRTIO_F_VERSION_1], ids=["no-event-idx", "version-1-only"])
async def test_minimal_feature_sets(disk, sock_dir, wanted):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M", num_queues=2)
    async with blk_guest(fn, sock_dir, wanted=wanted) as drv:
        assert not drv.event_idx
        await drv.write(0, 0, pattern(3, 8192))
        assert await drv.read(0, 0, 8192) == pattern(3, 8192)
        if wanted == 1 << vp.VIRTIO_F_VERSION_1:
            # Without MQ the driver still sees num_queues, but DISCARD was not negotiated.
            assert (await drv.request(0, T_DISCARD, out=struct.pack("<QII", 0, 8, 0)))[0] == S_UNSUPP
    fn.close()


async def test_get_id_pads_and_truncates(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M", serial="x" * 30)
    async with blk_guest(fn, sock_dir) as drv:
        assert await drv.get_id() == b"x" * 20
        status, data, used = await drv.request(0, T_GET_ID, in_len=8)  # short buffer: truncated
        assert (status, data, used) == (S_OK, b"x" * 8, 9)
    fn.close()
    fn = VirtioBlkFunction("vb1", path=disk, serial="ab")
    async with blk_guest(fn, sock_dir) as drv:
        status, data, _ = await drv.request(0, T_GET_ID, in_len=20)
        assert data == b"ab" + bytes(18)
    fn.close()


async def test_discard_and_write_zeroes(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="4M")
    async with blk_guest(fn, sock_dir) as drv:
        await drv.write(0, 0, pattern(4, 64 * 1024))
        seg = struct.pack("<QII", 16, 16, 0)  # zero sectors 16..31
        assert (await drv.request(0, T_WRITE_ZEROES, out=seg))[0] == S_OK
        seg = struct.pack("<QII", 64, 16, 1)  # with UNMAP allowed
        assert (await drv.request(0, T_WRITE_ZEROES, out=seg))[0] == S_OK
        assert (await drv.request(0, T_DISCARD, out=struct.pack("<QII", 96, 8, 0)))[0] == S_OK
        expect = bytearray(pattern(4, 64 * 1024))
        expect[16 * 512 : 32 * 512] = bytes(16 * 512)
        expect[64 * 512 : 80 * 512] = bytes(16 * 512)
        back = await drv.read(0, 0, 64 * 1024)
        assert back[: 96 * 512] == expect[: 96 * 512]
        assert back[104 * 512 :] == expect[104 * 512 :]  # discard touched only its own range
        # Bad segments: flags a discard cannot have, range past the end, ragged payload.
        assert (await drv.request(0, T_DISCARD, out=struct.pack("<QII", 0, 8, 1)))[0] == S_UNSUPP
        assert (await drv.request(0, T_WRITE_ZEROES, out=struct.pack("<QII", 8190, 8, 0)))[0] == S_IOERR
        assert (await drv.request(0, T_WRITE_ZEROES, out=b"\0" * 10))[0] == S_IOERR
    data = host_read(disk, 0, 64 * 1024)
    assert data[16 * 512 : 32 * 512] == bytes(16 * 512) and data[:16 * 512] == expect[:16 * 512]
    fn.close()


# ---------------------------------------------------------------------- read-only, backing errors


async def test_readonly_device_refuses_writes(disk, sock_dir):
    with open(disk, "wb") as f:
        f.write(pattern(5, MiB))
    fn = VirtioBlkFunction("ro", path=disk, readonly=True)
    async with blk_guest(fn, sock_dir) as drv:
        assert drv.features >> 5 & 1  # VIRTIO_BLK_F_RO
        assert not drv.device_features >> 13 & 1 and not drv.device_features >> 14 & 1
        status, _, _ = await drv.request(0, T_OUT, 0, out=b"\xee" * 4096)
        assert status == S_IOERR
        assert (await drv.request(0, T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 0)))[0] == S_UNSUPP
        assert await drv.read(0, 0, 4096) == pattern(5, MiB)[:4096]
        assert await drv.flush() == S_OK
    assert host_read(disk, 0, MiB) == pattern(5, MiB)
    fn.close()


async def test_enospc_on_dev_full_fails_the_write_only(sock_dir):
    fn = VirtioBlkFunction("full", path="/dev/full", size="1M")
    async with blk_guest(fn, sock_dir) as drv:
        status, _, used = await drv.request(0, T_OUT, 0, out=b"\x11" * 4096)
        assert (status, used) == (S_IOERR, 1)
        assert await drv.read(0, 0, 4096) == bytes(4096)  # the device keeps serving
        assert await drv.status() & NEEDS_RESET == 0
    assert fn.counters.errors["virtio_blk_backing"] >= 1
    fn.close()


async def test_eio_from_the_backing_file(sock_dir):
    # Reading /proc/self/mem where nothing is mapped (page 0) fails with a real EIO.
    fn = VirtioBlkFunction("eio", path="/proc/self/mem", readonly=True, size=4096)
    async with blk_guest(fn, sock_dir) as drv:
        status, _, _ = await drv.request(0, T_IN, 0, in_len=4096)
        assert status == S_IOERR
        assert await drv.get_id() == b"eio"
    fn.close()


async def test_request_level_errors_keep_the_device(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M")
    async with blk_guest(fn, sock_dir) as drv:
        assert (await drv.request(0, T_IN, 2048, in_len=512))[0] == S_IOERR  # past the end
        assert (await drv.request(0, T_IN, 2047, in_len=1024))[0] == S_IOERR  # straddles the end
        assert (await drv.request(0, T_IN, 0, in_len=100))[0] == S_IOERR  # not whole sectors
        assert (await drv.request(0, 99, 0))[0] == S_UNSUPP  # unknown type
        # Wrong directions for the type: OUT with device-writable data, IN with readable data.
        assert (await drv.request(0, T_OUT, 0, out=b"a" * 512, in_len=512))[0] == S_IOERR
        assert (await drv.request(0, T_IN, 0, out=b"a" * 512, in_len=512))[0] == S_IOERR
        await drv.write(0, 0, pattern(6, 4096))
        assert await drv.status() & NEEDS_RESET == 0
    assert host_read(disk, 0, 4096) == pattern(6, 4096)
    fn.close()


async def test_data_buffer_outside_guest_memory_fails_the_request(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M")
    async with blk_guest(fn, sock_dir) as drv:
        mem, q = drv.mem, drv.queues[0]
        h = mem.alloc(32)
        mem.write(h, hdr(T_IN, 0) + b"\xff")
        await raw_chain(q, [(h, 16, VRING_DESC_F_NEXT, 1),
                            (0x10, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),  # unmapped
                            (h + 16, 1, VRING_DESC_F_WRITE, 0)])
        with trio.fail_after(WAIT):
            while mem.read(h + 16, 1) == b"\xff":
                await trio.sleep(0.005)
        assert mem.read(h + 16, 1)[0] == S_IOERR
        assert await drv.status() & NEEDS_RESET == 0
    fn.close()


# ---------------------------------------------------------------------- broken rings -> NEEDS_RESET


def _loop(mem, h):
    return [(h, 16, VRING_DESC_F_NEXT, 1), (h + 16, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)]


def _too_long(mem, h):
    # An indirect table with more entries than the queue has descriptors.
    table = mem.alloc(16 * 300)
    return [(table, 16 * 300, VRING_DESC_F_INDIRECT, 0)]


def _indirect_loop(mem, h):
    table = mem.alloc(64)
    mem.write(table, struct.pack("<QIHH", h, 16, VRING_DESC_F_NEXT, 1)
              + struct.pack("<QIHH", h + 16, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0))
    return [(table, 32, VRING_DESC_F_INDIRECT, 0)]


def _next_outside(mem, h):
    return [(h, 16, VRING_DESC_F_NEXT, 999)]


def _readable_after_writable(mem, h):
    return [(h + 16, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), (h, 16, 0, 0)]


def _no_status(mem, h):
    return [(h, 17, 0, 0)]


def _header_unmapped(mem, h):
    return [(0x10, 16, VRING_DESC_F_NEXT, 1), (h + 16, 1, VRING_DESC_F_WRITE, 0)]


def _desc_table_entry(mem, h):
    return [(h, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1)]


@pytest.mark.parametrize("build", [_loop, _too_long, _indirect_loop, _next_outside,
                                   _readable_after_writable, _no_status, _header_unmapped,
                                   _desc_table_entry])
async def test_broken_chain_sets_needs_reset_and_device_recovers(disk, sock_dir, build):
    other_disk = disk + ".other"
    other = VirtioBlkFunction("other", path=other_disk, size="1M")
    fn = VirtioBlkFunction("vb0", path=disk, size="1M", queue_size=256)
    async with serving(other, sock_dir, "other.sock") as other_server, \
            zclient.connect(other_server.path) as oc, \
            open_blk(oc, GuestMemory(4 * MiB)) as other_drv:
        async with blk_guest(fn, sock_dir) as drv:
            mem, q = drv.mem, drv.queues[0]
            h = mem.alloc(32)
            mem.write(h, hdr(T_IN, 0) + b"\xff")
            read_eventfd(drv.eventfds[0])
            await raw_chain(q, build(mem, h))
            await wait_status(drv, NEEDS_RESET)
            assert await wait_eventfd(drv.eventfds[0], WAIT)  # config-change interrupt
            assert await drv.read_isr() & vp.VIRTIO_PCI_ISR_CONFIG
            # Other functions in the same daemon are unaffected.
            await other_drv.write(0, 0, pattern(7, 4096))
            assert await other_drv.read(0, 0, 4096) == pattern(7, 4096)
            # The driver resets and brings the device back.
            await drv.reinit()
            assert await drv.status() & NEEDS_RESET == 0
        async with blk_guest(fn, sock_dir) as drv:
            await drv.write(0, 8, pattern(8, 4096))
            assert await drv.read(0, 8, 4096) == pattern(8, 4096)
    assert fn.counters.errors["virtio_ring"] >= 1
    fn.close()
    other.close()


async def test_avail_index_jumping_past_queue_size(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M", queue_size=16)
    async with blk_guest(fn, sock_dir) as drv:
        q = drv.queues[0]
        drv.mem.put16(q.avail + 2, 100)
        await q.notify()
        await wait_status(drv, NEEDS_RESET)
    fn.close()


async def test_queue_size_not_power_of_two_is_refused(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M")
    async with serving(fn, sock_dir) as server, zclient.connect(server.path) as c:
        mem = GuestMemory(MiB)
        await mem.map(c)
        from zpcid.vmm.virtio_driver import VirtioBlkDriver
        drv = VirtioBlkDriver(c, mem)
        await drv.probe()
        await drv.reset()
        await drv.set_status(vp.VIRTIO_CONFIG_S_ACKNOWLEDGE | vp.VIRTIO_CONFIG_S_DRIVER)
        await drv.common_write(vp.COMMON_GF, 4, 0)
        await drv.common_write(vp.COMMON_GFSELECT, 4, 1)
        await drv.common_write(vp.COMMON_GF, 4, 1)  # VERSION_1
        await drv.add_status(vp.VIRTIO_CONFIG_S_FEATURES_OK)
        assert await drv.status() & vp.VIRTIO_CONFIG_S_FEATURES_OK
        await drv.common_write(vp.COMMON_Q_SELECT, 2, 0)
        await drv.common_write(vp.COMMON_Q_SIZE, 2, 100)
        for off, addr in ((vp.COMMON_Q_DESCLO, mem.base), (vp.COMMON_Q_AVAILLO, mem.base + 0x1000),
                          (vp.COMMON_Q_USEDLO, mem.base + 0x2000)):
            await drv.common_write(off, 8, addr)
        await drv.common_write(vp.COMMON_Q_ENABLE, 2, 1)
        assert await drv.common_read(vp.COMMON_Q_ENABLE, 2) == 0
        assert await drv.status() & NEEDS_RESET
        # Misaligned rings are refused the same way (after a reset).
        await drv.reset()
        assert await drv.status() == 0
        await drv.common_write(vp.COMMON_Q_SIZE, 2, 64)
        await drv.common_write(vp.COMMON_Q_DESCLO, 8, mem.base + 8)
        await drv.common_write(vp.COMMON_Q_ENABLE, 2, 1)
        assert await drv.common_read(vp.COMMON_Q_ENABLE, 2) == 0
        # Features without VERSION_1 are refused at FEATURES_OK.
        await drv.reset()
        await drv.set_status(vp.VIRTIO_CONFIG_S_ACKNOWLEDGE | vp.VIRTIO_CONFIG_S_DRIVER)
        await drv.add_status(vp.VIRTIO_CONFIG_S_FEATURES_OK)
        assert not await drv.status() & vp.VIRTIO_CONFIG_S_FEATURES_OK
        # A vector the function does not have reads back as NO_VECTOR.
        await drv.common_write(vp.COMMON_MSIX, 2, 50)
        assert await drv.common_read(vp.COMMON_MSIX, 2) == vp.VIRTIO_MSI_NO_VECTOR
        mem.close()
    fn.close()


async def test_notifications_for_queues_not_enabled_are_ignored(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M", num_queues=2)
    async with blk_guest(fn, sock_dir, num_queues=1) as drv:
        c = drv.client
        notify = drv.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
        await c.region_write(0, notify.offset + 4, struct.pack("<H", 1))  # queue 1: never enabled
        await c.region_write(0, notify.offset + 0x400, struct.pack("<H", 256))  # no such queue
        await drv.write(0, 0, pattern(9, 4096))
        assert await drv.read(0, 0, 4096) == pattern(9, 4096)
        assert await drv.status() & NEEDS_RESET == 0
    assert fn.counters.errors["virtio_bad_notify"] == 2
    fn.close()


# ---------------------------------------------------------------------- reset / re-attach


async def _reset_mid_io(fn, disk, sock_dir, how):
    nreq, size = 48, 128 * 1024
    async with blk_guest(fn, sock_dir) as drv:
        mem, q = drv.mem, drv.queues[0]
        for i in range(nreq):
            h = mem.alloc(32)
            data = mem.alloc(size)
            mem.write(h, hdr(T_OUT, i * size // 512) + b"\xff")
            mem.write(data, bytes([i + 1]) * size)
            head = await q.add([(h, 16, False), (data, size, False), (h + 16, 1, True)])
            q.publish(head)
        await q.notify()
        with trio.fail_after(WAIT):
            while fn.stats["writes"] < 1:
                await trio.sleep(0.001)
        if how == "status":
            await drv.set_status(0)  # returns once in-flight requests have drained
            assert await drv.status() == 0
        else:
            await drv.client.reset()  # vfio-user DEVICE_RESET
        used_after_reset = mem.u16(q.used + 2)
        written = fn.stats["writes"]
        assert written < nreq  # the reset stopped the queue before it ran dry
        # The device comes back and the old ring stays untouched by it.
        await drv.reinit()
        for i in range(nreq):
            block = await drv.read(0, i * size // 512, size)
            assert block in (bytes(size), bytes([i + 1]) * size), i  # all or nothing per request
        assert mem.u16(q.used + 2) == used_after_reset
        assert fn.stats["writes"] == written
    image = host_read(disk, 0, nreq * size)
    done = sum(image[i * size : (i + 1) * size] == bytes([i + 1]) * size for i in range(nreq))
    assert done >= used_after_reset  # every acknowledged write is in the file


@pytest.mark.parametrize("how", ["status", "device-reset"])
async def test_reset_mid_io_stops_processing_and_keeps_file_consistent(disk, sock_dir, how):
    # (one worker thread paces the requests, so the reset lands before the ring ran dry)
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", io_threads=1, aio="threads")
    await _reset_mid_io(fn, disk, sock_dir, how)
    fn.close()



async def queue_writes(drv, mem, n, size):
    """Publish ``n`` writes of ``size`` bytes (request i fills with byte i+1), notify."""
    q = drv.queues[0]
    for i in range(n):
        h, data = mem.alloc(32), mem.alloc(size)
        mem.write(h, hdr(T_OUT, i * size // 512) + b"\xff")
        mem.write(data, bytes([i + 1]) * size)
        q.publish(await q.add([(h, 16, False), (data, size, False), (h + 16, 1, True)]))
    await q.notify()


async def start_writes(fn, drv, mem, n, size):
    """Queue ``n`` writes (see queue_writes) and return once the device has started on them."""
    await queue_writes(drv, mem, n, size)
    with trio.fail_after(WAIT):
        while fn.stats["writes"] < 1:
            await trio.sleep(0.001)

async def test_detach_mid_io_and_reattach(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", io_threads=1)
    nreq, size = 32, 128 * 1024
    async with serving(fn, sock_dir) as server:
        async with zclient.connect(server.path) as c:
            mem = GuestMemory(16 * MiB)
            async with open_blk(c, mem) as drv:
                await start_writes(fn, drv, mem, nreq, size)
            # leaving the client context disconnects mid-I/O
        with trio.fail_after(WAIT):
            while server.attached or not fn.service.done.is_set():
                await trio.sleep(0.005)
        mem.close()
        assert not fn.dirty  # the service synced the file when it stopped
        image = host_read(disk, 0, nreq * size)
        for i in range(nreq):
            assert image[i * size : (i + 1) * size] in (bytes(size), bytes([i + 1]) * size)
        # A new client sees exactly what the host sees.
        async with zclient.connect(server.path) as c:
            mem = GuestMemory(16 * MiB)
            async with open_blk(c, mem) as drv:
                assert await drv.read(0, 0, nreq * size) == image
                await drv.write(0, 0, pattern(10, 4096))
            mem.close()
    assert host_read(disk, 0, 4096) == pattern(10, 4096)
    fn.close()


async def test_close_right_after_detach_releases_the_file(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", io_threads=1)
    size = 256 * 1024
    async with serving(fn, sock_dir) as server:
        async with zclient.connect(server.path) as c:
            mem = GuestMemory(16 * MiB)
            async with open_blk(c, mem) as drv:
                await start_writes(fn, drv, mem, 16, size)
        with trio.fail_after(WAIT):
            while server.attached:
                await trio.sleep(0.001)
        fd = fn.backing.fd
        fn.close()  # a worker thread may still be writing: the service closes the file after it
        with trio.fail_after(WAIT):
            await fn.service.done.wait()
        assert fn.backing.fd == -1
        with pytest.raises(OSError):
            os.fstat(fd)
        mem.close()
    image = host_read(disk, 0, 16 * size)
    for i in range(16):
        assert image[i * size : (i + 1) * size] in (bytes(size), bytes([i + 1]) * size)


async def test_driver_refuses_non_virtio(disk, sock_dir):
    from zpcid.devices.memory import MemoryFunction
    fn = MemoryFunction("m")
    async with serving(fn, sock_dir) as server, zclient.connect(server.path) as c:
        mem = GuestMemory(MiB)
        with pytest.raises(DriverError):
            async with open_blk(c, mem):
                pass
        mem.close()
    fn.close()


# ---------------------------------------------------------------------- cache modes


async def _raw_rw(drv, rtype: int, sector: int, pieces: list[tuple[int, int]]) -> int:
    """One request whose data sits in ``pieces`` (addr, len) exactly where the test put
    them (unaligned on purpose); returns the status byte."""
    q, mem = drv.queues[0], drv.mem
    h = mem.alloc(32)
    mem.write(h, hdr(rtype, sector) + b"\xff")
    writable = rtype == T_IN
    bufs = [(h, 16, False)] + [(a, n, writable) for a, n in pieces] + [(h + 16, 1, True)]
    used = await q.submit(bufs)
    status = mem.read(h + 16, 1)[0]
    assert used == 1 + (sum(n for _, n in pieces) if writable and status == S_OK else 0)
    mem.free(h, 32)
    return status


def uring_or_skip() -> None:
    try:
        uring.Ring(8).close()
    except uring.Unavailable as exc:
        pytest.skip(f"no io_uring here: {exc}")


@pytest.mark.parametrize("aio", ["io_uring", "threads"])
@pytest.mark.parametrize("cache", ["none", "writeback", "writethrough", "directsync"])
async def test_cache_modes_move_the_same_data(disk, sock_dir, cache, aio):
    if aio == "io_uring":
        uring_or_skip()
    fn = VirtioBlkFunction("vb0", path=disk, size="4M", cache=cache, aio=aio)
    direct = cache in ("none", "directsync")
    if direct:
        assert fcntl.fcntl(fn.backing.dfd, fcntl.F_GETFL) & os.O_DIRECT
    async with blk_guest(fn, sock_dir) as drv:
        assert fn.describe()["virtio"]["aio"] == aio
        ops = fn.ring_ops
        # FLUSH only where the device has a volatile cache (no O_DSYNC).
        assert bool(drv.device_features >> 9 & 1) == (cache in ("none", "writeback"))
        mem = drv.mem
        aligned = pattern(11, 64 * 1024)
        await drv.write(0, 0, aligned)
        # Guest buffers that O_DIRECT cannot take: odd addresses, split across descriptors.
        base = mem.alloc(3 * 4096)
        odd = pattern(12, 4096)
        mem.write(base + 3, odd[:1536])
        mem.write(base + 4096 + 5, odd[1536:])
        assert await _raw_rw(drv, T_OUT, 200, [(base + 3, 1536), (base + 4096 + 5, 2560)]) == S_OK
        assert await drv.flush() == S_OK
        assert await drv.read(0, 0, len(aligned)) == aligned
        mem.write(base + 7, bytes(4096))
        assert await _raw_rw(drv, T_IN, 200, [(base + 7, 4096)]) == S_OK
        assert mem.read(base + 7, 4096) == odd
        assert await drv.read(0, 200, 4096) == odd
        # An unaligned buffer larger than one bounce chunk (1 MiB).
        big = pattern(14, MiB + 8192)
        at = mem.alloc(len(big) + 4096) + 9
        mem.write(at, big)
        assert await _raw_rw(drv, T_OUT, 1024, [(at, len(big))]) == S_OK
        mem.write(at, bytes(len(big)))
        assert await _raw_rw(drv, T_IN, 1024, [(at, len(big))]) == S_OK
        assert mem.read(at, len(big)) == big
    assert host_read(disk, 1024 * 512, len(big)) == big
    assert host_read(disk, 0, len(aligned)) == aligned and host_read(disk, 200 * 512, 4096) == odd
    assert fn.describe()["virtio"]["cache"] == cache
    assert fn.stats["flushes"] == 1
    # O_DIRECT requests and writes go through the ring (page-cache reads finish inline)
    assert (fn.ring_ops > ops) == (aio == "io_uring")
    # Only the two unaligned requests went through a bounce buffer, and only under O_DIRECT.
    assert fn.describe()["virtio"]["bounced"] == (4 if direct else 0)
    fn.close()


def test_cache_option_is_validated_with_the_key_named(tmp_path):
    from zpcid.service import config

    text = f"""
[daemon]
runtime-dir = "{tmp_path}"
[[function]]
type = "virtio-blk"
fid = 1
uid = 1
path = "{tmp_path / 'd.img'}"
size = "1M"
cache = "fast"
"""
    with pytest.raises(config.ConfigError, match="key 'cache'.*'fast' is not one of: writeback, none"):
        config.parse_text(text, "t.toml").functions[0].create()
    fn = config.parse_text(text.replace('"fast"', '"directsync"'), "t.toml").functions[0].create()
    try:
        assert fn.backing.cache == "directsync"
    finally:
        fn.close()
    fn = VirtioBlkFunction("d", path=str(tmp_path / "d.img"))
    assert fn.backing.cache == "writeback"  # the default, as QEMU's
    fn.close()


async def test_a_full_ring_is_drained_and_answered_with_few_interrupts(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", queue_size=128)
    async with blk_guest(fn, sock_dir) as drv:
        await drv.write(0, 0, pattern(13, 64 * 4096))
        q = drv.queues[0]
        interrupts, notifications = q.interrupts, q.notifications
        results = {}

        async def rd(i):
            results[i] = await drv.read(0, i * 8, 4096)

        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(rd, i)
        assert all(results[i] == pattern(13, 64 * 4096)[i * 4096 : (i + 1) * 4096] for i in range(64))
        # 64 requests published in one scheduler pass: EVENT_IDX lets the driver kick
        # once for many, and completions go back in batches under one interrupt each.
        assert q.notifications - notifications < 64
        assert q.interrupts - interrupts < 64
    fn.close()


# ---------------------------------------------------------------------- snapshot / restore


def _through_bytes(snap):
    """What a hand-over to another process does: JSON bytes plus duplicated fds."""
    blob, fds = S.dumps(S.dup_fds(snap))
    return S.loads(blob, fds)


async def _common_regs(client) -> bytes:
    return (await client.region_read(0, 0, 0x40) + await client.region_read(0, 0x2000, 0x3C)
            + await client.region_read(7, 0, 256))


async def test_snapshot_restore_continues_the_rings_in_a_fresh_function(disk, sock_dir):
    make = lambda: VirtioBlkFunction("vb0", path=disk, size="4M", num_queues=2)  # noqa: E731
    old = make()
    async with serving(old, sock_dir, "old.sock") as old_srv, zclient.connect(old_srv.path) as c1:
        mem = GuestMemory(GUEST_MEM_SNAP)
        try:
            async with open_blk(c1, mem) as drv:
                for i in range(5):  # ring positions away from zero, on both queues
                    await drv.write(i % 2, i * 8, pattern(20 + i, 4096))
                assert await drv.read(1, 8, 4096) == pattern(21, 4096)
                regs = await _common_regs(c1)
                snap = old.snapshot()
                assert snap.device.queues and snap.device.dirty
                fresh = make()
                fresh.restore(_through_bytes(snap))
                assert S.same(fresh.snapshot(), snap)  # identical snapshot
                old_stats = dict(old.stats)
                async with serving(fresh, sock_dir, "new.sock") as new_srv, \
                        zclient.connect(new_srv.path) as c2:
                    assert await _common_regs(c2) == regs  # identical registers
                    drv.client = c2  # the driver's notifications now reach the restored function
                    for i in range(5, 40):  # past the used index the old function left
                        await drv.write(i % 2, i * 8, pattern(20 + i, 4096))
                    for i in range(40):
                        assert await drv.read(i % 2, i * 8, 4096) == pattern(20 + i, 4096)
                    assert await drv.flush(1) == S_OK
                    assert fresh.stats["writes"] == old_stats["writes"] + 35
                    drv.client = c1
                assert old.stats == old_stats  # the old function saw none of it
        finally:
            mem.close()
    for i in range(40):
        assert host_read(disk, i * 8 * 512, 4096) == pattern(20 + i, 4096)
    old.close()
    fresh.close()


async def test_snapshot_is_refused_with_requests_in_flight_and_restore_checks_the_disk(disk, sock_dir,
                                                                                      tmp_path):
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", io_threads=1, aio="threads")
    async with blk_guest(fn, sock_dir) as drv:
        await start_writes(fn, drv, drv.mem, 8, 256 * 1024)
        with pytest.raises(S.SnapshotError, match="in flight"):
            fn.snapshot()
        await drv.reinit()
        snap = fn.device_snapshot()
    other = VirtioBlkFunction("vb0", path=str(tmp_path / "other.img"), size="8M")
    with pytest.raises(S.SnapshotError, match="not the snapshot's"):
        other.device_restore(S.dup_fds(snap))
    wrong_cache = VirtioBlkFunction("vb0", path=disk, cache="none")
    copy = S.dup_fds(snap)
    with pytest.raises(S.SnapshotError, match="cache mode"):
        wrong_cache.device_restore(copy)
    with pytest.raises(OSError):
        os.fstat(copy.backing)  # the restore took the fd, also when it refused
    for f in (fn, other, wrong_cache):
        f.close()


async def test_client_leaving_during_a_dma_read_is_reported_as_gone(disk, sock_dir):
    """The VMM dies instead of answering the device's DMA_READ: the log says so."""
    import socket

    fn = VirtioBlkFunction("vb0", path=disk, size="1M")
    with structlog.testing.capture_logs() as logs:
        async with blk_guest(fn, sock_dir, shared=False) as drv:
            client = drv.client
            asked = trio.Event()

            async def vanish(msg):
                asked.set()  # and never answer

            client._serve = vanish
            buf = drv.mem.alloc(512)
            status = drv.mem.alloc(1)
            await raw_chain(drv.queues[0], [(buf, 16, VRING_DESC_F_NEXT, 1),
                                            (status, 1, VRING_DESC_F_WRITE, 0)])
            with trio.fail_after(WAIT):
                await asked.wait()
                # The VMM dies with the device's DMA_READ unanswered (after the reply to
                # its notify arrived: the device may ask before that reply is read).
                client.transport.raw.shutdown(socket.SHUT_RDWR)
                while fn.session is not None:
                    await trio.sleep(0.01)
    events = [e for e in logs if e["event"].startswith("virtio")]
    gone = [e for e in events if e["event"] == "virtio_blk_client_gone"]
    assert gone and "client went away" in gone[0]["error"]
    assert "0x0+0x0" not in gone[0]["error"]
    assert not [e for e in events if e["event"] == "virtio_needs_reset"]
    fn.close()


async def test_rings_unmapped_under_a_live_queue_are_a_device_error_not_stale_memory(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="1M")
    async with blk_guest(fn, sock_dir) as drv:
        mem, q = drv.mem, drv.queues[0]
        await drv.write(0, 0, pattern(30, 4096))  # the device now holds views of the rings
        with structlog.testing.capture_logs() as logs:
            await drv.client.dma_unmap(mem.base, mem.size)
        # The device let go of its ring views first: the mapping closed at once.
        assert not [e for e in logs if e["event"] == "dma_mapping_busy"]
        h = mem.alloc(32)
        mem.write(h, hdr(T_IN, 0) + b"\xff")
        d = mem.alloc(4096)
        await raw_chain(q, [(h, 16, VRING_DESC_F_NEXT, 1), (d, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                            (h + 16, 1, VRING_DESC_F_WRITE, 0)])
        await wait_status(drv, NEEDS_RESET)
        assert mem.read(h + 16, 1) == b"\xff" and mem.u16(q.used + 2) == q.last_used  # nothing written
        await mem.map(drv.client)
        await drv.reinit()
        assert await drv.read(0, 0, 4096) == pattern(30, 4096)
    assert fn.counters.errors["virtio_ring"] == 1
    fn.close()


async def test_quiesce_finishes_requests_in_flight_then_snapshot_and_resume(disk, sock_dir):
    # (one worker thread paces the requests, so the quiesce lands before the ring ran dry)
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", io_threads=1, max_inflight=2, aio="threads")
    nreq, size = 8, 256 * 1024
    async with blk_guest(fn, sock_dir) as drv:
        q = drv.queues[0]
        await start_writes(fn, drv, drv.mem, nreq, size)
        with trio.fail_after(WAIT):
            await fn.quiesce()
        used = drv.mem.u16(q.used + 2)
        assert 1 <= used < nreq  # those started finished and were returned; no new ones
        snap = fn.device_snapshot()
        assert snap.queues[0].used_idx == used
        # Heads taken from the ring but not started are kept for whoever resumes.
        assert (snap.queues[0].last_avail - len(snap.queues[0].heads)) % 65536 == used
        assert not snap.dirty  # the stopped service synced the file
        await trio.sleep(0.05)
        assert drv.mem.u16(q.used + 2) == used  # quiesced: nothing moves by itself
        fn.resume()
        with trio.fail_after(WAIT):
            while drv.mem.u16(q.used + 2) != nreq:
                await trio.sleep(0.005)
        await drv.write(0, 0, pattern(31, 4096))  # and the queue takes new requests
    image = host_read(disk, 0, nreq * size)
    assert image[:4096] == pattern(31, 4096)
    for i in range(1, nreq):
        assert image[i * size : (i + 1) * size] == bytes([i + 1]) * size
    fn.close()


async def _ring_busy(fn, drv, nreq: int, size: int) -> int:
    """Publish ``nreq`` writes (request i fills with byte i+1) and return, without a
    checkpoint, while some are submitted to the function's io_uring and not yet reaped."""
    await queue_writes(drv, drv.mem, nreq, size)
    with trio.fail_after(WAIT):
        while fn.ring is None or not fn.ring.pending:
            await trio.sleep(0)
    return len(fn.ring.pending)


@pytest.mark.parametrize("cache", ["none", "writeback"])
async def test_io_uring_requests_in_flight_block_snapshot_and_a_reset_drains_them(disk, sock_dir, cache):
    uring_or_skip()
    nreq, size = 32, 64 * 1024
    fn = VirtioBlkFunction("vb0", path=disk, size="8M", cache=cache)
    async with blk_guest(fn, sock_dir) as drv:
        q, mem = drv.queues[0], drv.mem
        ring = fn.ring
        assert await _ring_busy(fn, drv, nreq, size) >= 1
        # (no checkpoint since: the kernel still owns those buffers)
        with pytest.raises(S.SnapshotError, match="in flight"):
            fn.snapshot()
        await drv.set_status(0)  # returns once every ring operation has completed
        assert not ring.pending and not ring.accepting and ring.fd == -1
        used = mem.u16(q.used + 2)
        assert fn.stats["writes"] >= used
        await trio.sleep(0.01)
        assert mem.u16(q.used + 2) == used  # nothing reaches the old ring after the reset
        await drv.reinit()
        assert fn.ring is not None and fn.ring is not ring
        for i in range(nreq):  # every request all or nothing, acknowledged ones on disk
            block = await drv.read(0, i * size // 512, size)
            assert block in (bytes(size), bytes([i + 1]) * size), i
    image = host_read(disk, 0, nreq * size)
    done = [image[i * size : (i + 1) * size] == bytes([i + 1]) * size for i in range(nreq)]
    assert sum(done) >= used
    fn.close()


async def test_io_uring_quiesce_drains_the_ring_then_resume(disk, sock_dir):
    uring_or_skip()
    nreq, size = 16, 64 * 1024
    fn = VirtioBlkFunction("vb0", path=disk, size="8M")
    async with blk_guest(fn, sock_dir) as drv:
        q = drv.queues[0]
        ring = fn.ring
        assert await _ring_busy(fn, drv, nreq, size) >= 1
        with trio.fail_after(WAIT):
            await fn.quiesce()
        assert not ring.pending and ring.fd == -1  # the stopped service closed its ring
        snap = fn.device_snapshot()
        used = drv.mem.u16(q.used + 2)
        assert snap.queues[0].used_idx == used >= 1
        fn.resume()
        with trio.fail_after(WAIT):
            while drv.mem.u16(q.used + 2) != nreq:
                await trio.sleep(0.005)
        assert fn.describe()["virtio"]["aio"] == "io_uring"
    image = host_read(disk, 0, nreq * size)
    assert all(image[i * size : (i + 1) * size] == bytes([i + 1]) * size for i in range(nreq))
    fn.close()


async def test_io_uring_backing_errors_fail_the_request_only(sock_dir):
    uring_or_skip()
    fn = VirtioBlkFunction("vb0", path="/dev/full", size="1M")  # every write: ENOSPC
    async with blk_guest(fn, sock_dir) as drv:
        assert fn.describe()["virtio"]["aio"] == "io_uring"
        ops = fn.ring_ops
        with pytest.raises(DriverError, match="status 1"):
            await drv.write(0, 0, bytes(4096))
        assert fn.ring_ops == ops + 1  # the write went to the ring, which answered ENOSPC
        assert await drv.read(0, 0, 4096) == bytes(4096)
        assert await drv.status() & NEEDS_RESET == 0
    assert fn.counters.errors["virtio_blk_backing"] == 1
    fn.close()


async def test_driver_batches_reads_under_one_kick_and_fails_requests_never_completed(disk, sock_dir):
    fn = VirtioBlkFunction("vb0", path=disk, size="4M")
    async with blk_guest(fn, sock_dir) as drv:
        data = pattern(40, 32 * 4096)
        await drv.write(0, 0, data)
        q = drv.queues[0]
        kicks = q.notifications
        got = await drv.read_many(0, [(i * 8, 4096) for i in reversed(range(32))])
        assert got == [data[i * 4096 : (i + 1) * 4096] for i in reversed(range(32))]
        assert q.notifications - kicks <= 1
        # More chains than the queue has descriptors (3 each): kicks as it runs out.
        with trio.fail_after(WAIT):
            got = await drv.read_many(0, [(i % 32 * 8, 4096) for i in range(q.size)])
        assert got == [data[i % 32 * 4096 : (i % 32 + 1) * 4096] for i in range(q.size)]
        # A device that stops answering: the request fails after the driver's timeout.
        with trio.fail_after(WAIT):
            await fn.quiesce()
        drv.timeout = 0.2
        with trio.fail_after(WAIT), pytest.raises(DriverError, match="no completion"):
            await drv.read(0, 0, 4096)
        # (its buffers went back to the allocator: a driver resets the device before reuse)
        fn.resume()
        drv.timeout = WAIT
        await drv.reinit()
        assert await drv.read(0, 8, 4096) == data[4096:8192]
    fn.close()
