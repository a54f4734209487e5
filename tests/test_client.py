"""The reference client against a served `memory` function: regions, DMA both ways, MSI-X."""

import errno
import os
import struct

import pytest
import trio
from hypothesis import given, settings, strategies as st

import zpcid.vmm.client
from vfio_raw import find_capability, memory_server

from protocol.vfio_user import consts as C
from zpcid.vmm.client import read_eventfd
from zpcid.devices.memory import (DMA_CMD_FROM_HOST, DMA_CMD_TO_HOST, REG_DMA_ADDR, REG_DMA_CMD,
                                  REG_DMA_LEN, REG_DMA_STATUS, REG_DOORBELL, REG_RINGS,
                                  DMA_STATUS_BUSY)
from zpcid.vfio_user.memfd import Memfd
from zpcid.pci.config import PCI_CAP_ID_EXP, PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL

MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX
BAR0, BAR2, BAR4, CONFIG = 0, 2, 4, 7


async def run_dma(c, addr, length, cmd):
    await c.region_write(BAR4, REG_DMA_ADDR, struct.pack("<Q", addr))
    await c.region_write(BAR4, REG_DMA_LEN, struct.pack("<I", length))
    await c.region_write(BAR4, REG_DMA_CMD, struct.pack("<I", cmd))
    # The copy runs after the command write is answered: poll while busy.
    with trio.fail_after(5):
        while True:
            st = struct.unpack("<I", await c.region_read(BAR4, REG_DMA_STATUS, 4))[0]
            if st != DMA_STATUS_BUSY:
                return st


async def msix_setup(c):
    """Find MSI-X by walking the capability list; return (cap offset, table BIR/offset, PBA BIR/offset)."""
    cfg = await c.region_read(CONFIG, 0, 256)
    assert cfg[0x06] & 0x10  # capabilities list present
    cap = find_capability(cfg, PCI_CAP_ID_MSIX)
    assert cap
    _ctl, table, pba = struct.unpack_from("<HII", cfg, cap + 2)
    return cap, (table & 7, table & ~7), (pba & 7, pba & ~7)


async def test_negotiated_capabilities(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            assert c.server_version == (0, 0)
            caps = c.server_caps
            assert caps.max_msg_fds >= 1 and caps.max_data_xfer_size == 1 << 20
            assert caps.write_multiple  # the client offered it
            info = await c.get_info()
            assert info.num_regions == 10 and info.num_irqs == 5  # 9 PCI regions + zPCI control region


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 20) - 64), st.binary(min_size=1, max_size=64)),
                min_size=1, max_size=8))
def test_mmap_and_messages_see_the_same_region(writes):
    async def body():
        import tempfile, shutil
        d = tempfile.mkdtemp(prefix="zpcid-t")
        try:
            async with memory_server(d) as (fn, server):
                async with zpcid.vmm.client.connect(server.path) as c:
                    rm = await c.region_info(BAR0)
                    assert rm.mm is not None and rm.covers(0, fn.ram.size)
                    for i, (off, data) in enumerate(writes):
                        # Alternate the path of the write; both reads must agree.
                        await c.region_write(BAR0, off, data, via_mmap=bool(i % 2))
                        for o, d_ in writes[: i + 1]:
                            via_msg = await c.region_read(BAR0, o, len(d_), via_mmap=False)
                            via_map = await c.region_read(BAR0, o, len(d_), via_mmap=True)
                            assert via_msg == via_map
                        assert await c.region_read(BAR0, off, len(data), via_mmap=False) == data
        finally:
            shutil.rmtree(d, ignore_errors=True)

    trio.run(body)


async def test_posted_writes_are_applied_in_order(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            for i in range(50):
                await c.region_write(BAR0, 0, struct.pack("<I", i), via_mmap=False, posted=True)
            assert await c.region_read(BAR0, 0, 4, via_mmap=False) == struct.pack("<I", 49)


async def test_message_mode_dma_goes_through_the_client(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            guest = bytearray(64 << 10)
            await c.dma_map(0x4000_0000, len(guest), buf=guest)
            pattern = bytes(range(256)) * 64  # 16 KiB
            await c.region_write(BAR0, 0, pattern, via_mmap=False)
            assert await run_dma(c, 0x4000_1000, len(pattern), DMA_CMD_TO_HOST) == 0
            assert guest[0x1000 : 0x1000 + len(pattern)] == pattern
            assert c.dma_requests >= 1
            guest[0x8000:0x8010] = b"from-the-guest.."
            assert await run_dma(c, 0x4000_8000, 16, DMA_CMD_FROM_HOST) == 0
            assert await c.region_read(BAR0, 0, 16, via_mmap=False) == b"from-the-guest.."


async def test_message_mode_dma_larger_than_the_client_transfer_limit(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        caps = zpcid.vmm.client.CLIENT_CAPS
        import attrs
        small = attrs.evolve(caps, max_data_xfer_size=4096)
        async with zpcid.vmm.client.connect(server.path, caps=small) as c:
            guest = bytearray(64 << 10)
            await c.dma_map(0, len(guest), buf=guest)
            data = os.urandom(20000)
            await c.region_write(BAR0, 0, data, via_mmap=False)
            assert await run_dma(c, 0x100, len(data), DMA_CMD_TO_HOST) == 0
            assert guest[0x100 : 0x100 + len(data)] == data
            assert c.dma_requests == 5  # split at the client's limit


async def test_fd_backed_dma_needs_no_messages(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        with Memfd(1 << 20, "zpcid-test-guest") as guest:
            async with zpcid.vmm.client.connect(server.path) as c:
                await c.dma_map(0x1_0000_0000, 1 << 20, guest.fd, 0)
                guest.write(0x2000, b"page of guest memory")
                assert await run_dma(c, 0x1_0000_2000, 20, DMA_CMD_FROM_HOST) == 0
                assert await c.region_read(BAR0, 0, 20, via_mmap=False) == b"page of guest memory"
                await c.region_write(BAR0, 0, b"device wrote this", via_mmap=False)
                assert await run_dma(c, 0x1_0000_3000, 17, DMA_CMD_TO_HOST) == 0
                assert guest.read(0x3000, 17) == b"device wrote this"
                assert c.dma_requests == 0


async def test_dma_faults_set_status_and_the_session_continues(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        with Memfd(1 << 16, "zpcid-test-guest") as guest:
            async with zpcid.vmm.client.connect(server.path) as c:
                await c.dma_map(0x10000, 1 << 16, guest.fd, 0, write=False)
                # Nothing mapped there.
                assert await run_dma(c, 0x90000, 16, DMA_CMD_TO_HOST) == 1
                # Runs off the end of the mapping.
                assert await run_dma(c, 0x1FFF0, 32, DMA_CMD_FROM_HOST) == 1
                # A read-only mapping refuses device writes.
                assert await run_dma(c, 0x10000, 16, DMA_CMD_TO_HOST) == 1
                assert guest.read(0, 16) == bytes(16)
                # ...but reads are fine.
                assert await run_dma(c, 0x10000, 16, DMA_CMD_FROM_HOST) == 0
                # Message-mode memory the client does not have: it answers with an error.
                await c.dma_map(0x80000, 0x1000)
                assert await run_dma(c, 0x80000, 16, DMA_CMD_FROM_HOST) == 1
                assert await run_dma(c, 0x10000, 0, 7) == 1  # unknown command
                await c.get_info()


async def test_msix_delivery_masking_and_pba(sock_dir):
    async with memory_server(sock_dir, msix_vectors=4) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            cap, (table_bir, _), (pba_bir, pba_off) = await msix_setup(c)
            assert table_bir == pba_bir == BAR2
            irq = await c.irq_info(MSIX)
            assert irq.count == 4 and irq.flags & C.VFIO_IRQ_INFO_MASKABLE
            efds = await c.enable_irq_eventfds(MSIX, 4)
            try:
                await c.region_write(CONFIG, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))

                async def ring(v):
                    await c.region_write(BAR4, REG_DOORBELL, struct.pack("<I", v))

                async def pba():
                    return (await c.region_read(BAR2, pba_off, 8, via_mmap=False))[0]

                await ring(1)
                assert [read_eventfd(fd) for fd in efds] == [0, 1, 0, 0]
                # Protocol mask: the vector goes pending, UNMASK delivers it.
                mask = C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_MASK
                unmask = C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_UNMASK
                await c.set_irqs(MSIX, 3, 1, mask)
                await ring(3)
                assert read_eventfd(efds[3]) == 0 and await pba() == 0b1000
                await c.set_irqs(MSIX, 3, 1, unmask)
                assert read_eventfd(efds[3]) == 1 and await pba() == 0
                # Function mask in the control register does the same for every vector.
                await c.region_write(CONFIG, cap + 2,
                                     struct.pack("<H", PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL))
                await ring(0)
                await ring(2)
                assert await pba() == 0b0101 and [read_eventfd(fd) for fd in efds] == [0] * 4
                await c.region_write(CONFIG, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))
                assert [read_eventfd(fd) for fd in efds] == [1, 0, 1, 0] and await pba() == 0
                # BOOL data masks only the flagged vectors.
                await c.set_irqs(MSIX, 0, 4, C.VFIO_IRQ_SET_DATA_BOOL | C.VFIO_IRQ_SET_ACTION_MASK,
                                 data=b"\0\1\0\0")
                await ring(0)
                await ring(1)
                assert [read_eventfd(fd) for fd in efds] == [1, 0, 0, 0] and await pba() == 0b10
                # TRIGGER with DATA_NONE fires from the client side.
                await c.set_irqs(MSIX, 2, 1, C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER)
                assert read_eventfd(efds[2]) == 1
                # Doorbell for a vector the function does not have: counted, nothing fires.
                await ring(9)
                assert struct.unpack("<I", await c.region_read(BAR4, REG_RINGS, 4))[0] == 7
            finally:
                for fd in efds:
                    os.close(fd)


async def test_vector_without_eventfd_stays_pending_until_one_is_installed(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            cap, _, (_, pba_off) = await msix_setup(c)
            # QEMU's dynamic allocation: enable the index with no vectors, then add one.
            await c.set_irqs(MSIX, 0, 1, C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER)
            await c.region_write(CONFIG, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))
            await c.region_write(BAR4, REG_DOORBELL, struct.pack("<I", 1))
            assert (await c.region_read(BAR2, pba_off, 8, via_mmap=False))[0] == 0b10
            (fd,) = await c.enable_irq_eventfds(MSIX, 1, start=1)
            try:
                assert read_eventfd(fd) == 1
            finally:
                os.close(fd)
            await c.disable_irqs(MSIX)
            assert fn.irqs.installed() == 0


async def test_msix_table_writes_mask_per_vector(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            cap, (_, table_off), (_, pba_off) = await msix_setup(c)
            efds = await c.enable_irq_eventfds(MSIX, 4)
            try:
                await c.region_write(CONFIG, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))
                # A client that does program the table: vector 0 unmasked, others masked.
                entry = struct.pack("<QII", 0xFEE00000, 0x41, 0)
                await c.region_write(BAR2, table_off, entry, via_mmap=False)
                assert await c.region_read(BAR2, table_off, 16, via_mmap=False) == entry
                for v in (0, 1):
                    await c.region_write(BAR4, REG_DOORBELL, struct.pack("<I", v))
                assert [read_eventfd(fd) for fd in efds] == [1, 0, 0, 0]
                assert (await c.region_read(BAR2, pba_off, 8, via_mmap=False))[0] == 0b10
                # PBA writes are ignored.
                await c.region_write(BAR2, pba_off, b"\0" * 8, via_mmap=False)
                assert (await c.region_read(BAR2, pba_off, 8, via_mmap=False))[0] == 0b10
                await c.region_write(BAR2, table_off + 16 + 12, struct.pack("<I", 0), via_mmap=False)
                assert read_eventfd(efds[1]) == 1
            finally:
                for fd in efds:
                    os.close(fd)


async def test_pcie_capability_is_listed(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            cfg = await c.region_read(CONFIG, 0, 4096)
            exp = find_capability(cfg, PCI_CAP_ID_EXP)
            assert exp and cfg[exp + 2] & 0xF == 2  # capability version 2


async def test_error_replies_raise(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            with pytest.raises(zpcid.vmm.client.VfioUserError) as ei:
                await c.region_read(BAR4, 0x1000, 4, via_mmap=False)
            assert ei.value.errno == errno.EINVAL
            with pytest.raises(zpcid.vmm.client.VfioUserError):
                await c.irq_info(7)
            await c.get_info()


async def test_pipelined_dma_maps_with_the_reference_client(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        with Memfd(32 << 20, "zpcid-test-guest") as guest:
            async with zpcid.vmm.client.connect(server.path) as c:
                pending = [await c.dma_map_nowait(i << 20, 1 << 20, guest.fd, i << 20)
                           for i in range(32)]
                bad = await c.dma_map_nowait(0x800, 0x1000, guest.fd, 0)  # overlaps map 0
                for p in pending:
                    await c.wait_reply(p)
                with pytest.raises(zpcid.vmm.client.VfioUserError) as ei:
                    await c.wait_reply(bad)
                assert ei.value.errno == errno.EEXIST
                assert len(fn.dma) == 32 and fn.dma.file_count == 1


async def test_message_mode_dma_when_the_client_accepts_more_than_the_server(sock_dir):
    """A client advertising 4 MiB transfers: DMA_WRITEs may be that big, DMA_READ replies not."""
    import attrs

    big = attrs.evolve(zpcid.vmm.client.CLIENT_CAPS, max_data_xfer_size=4 << 20)
    async with memory_server(sock_dir, ram_size=4 << 20) as (fn, server):
        async with zpcid.vmm.client.connect(server.path, caps=big) as c:
            guest = bytearray(4 << 20)
            await c.dma_map(0, len(guest), buf=guest)
            data = os.urandom(3 << 20)
            fn.ram.mm[: len(data)] = data
            assert await run_dma(c, 0, len(data), DMA_CMD_TO_HOST) == 0
            assert guest[: len(data)] == data and c.dma_requests == 1
            guest[: len(data)] = data[::-1]
            assert await run_dma(c, 0, len(data), DMA_CMD_FROM_HOST) == 0
            assert fn.ram.mm[: len(data)] == data[::-1]
            assert c.dma_requests == 1 + 3  # replies limited to the server's 1 MiB
