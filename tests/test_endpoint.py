"""A vfio-user session at the byte level: a raw socket peer against a served `memory` function."""

import errno
import json
import mmap
import os
import struct

from helpers import open_fds
from vfio_raw import (QEMU_VERSION_PAYLOAD, message, memory_server, raw_connect, settle)

from protocol.vfio_user import consts as C
from protocol.vfio_user.header import HEADER_SIZE, Command, Flags
from zpcid.devices.memory import MAGIC, REG_MAGIC, REG_SCRATCH

BAR0, BAR2, BAR4, CONFIG = 0, 2, 4, C.VFIO_PCI_CONFIG_REGION_INDEX


def rd(region, offset, count):
    return struct.pack("<QII", offset, region, count)


def wr(region, offset, data):
    return struct.pack("<QII", offset, region, len(data)) + data


def u32(v):
    return struct.pack("<I", v)


async def test_version_exactly_as_qemu_sends_it(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            request = message(0x4242, Command.VERSION, QEMU_VERSION_PAYLOAD)
            assert len(request) == 214
            await peer.send(request)
            reply = await peer.recv()
            assert (reply.msg_id, reply.cmd) == (0x4242, Command.VERSION)
            assert reply.is_reply and not reply.is_error and reply.fds == ()
            # QEMU's reply buffer is the size of its own request.
            assert reply.size <= len(request)
            major, minor = struct.unpack_from("<HH", reply.payload)
            assert (major, minor) == (0, 0)
            assert reply.payload.endswith(b"\0") and reply.payload.count(b"\0", 4) == 1
            caps = json.loads(reply.payload[4:-1])["capabilities"]
            # QEMU assumes 8 if absent and rejects more than 16.
            assert 1 <= caps["max_msg_fds"] <= 16
            assert caps["max_data_xfer_size"] <= 64 << 20 and caps["pgsizes"] & 0xFFF == 0
            assert caps["max_dma_maps"] <= 65535 and caps["write_multiple"] is True
            # The session is live: a normal command is answered.
            info = await peer.call(1, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
            assert struct.unpack("<IIII", info.payload)[1] & C.VFIO_DEVICE_FLAGS_PCI


async def test_higher_minor_is_answered_with_zero(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            reply = await peer.call(1, Command.VERSION, struct.pack("<HH", 0, 7) + b"{}\0")
            assert struct.unpack_from("<HH", reply.payload) == (0, 0)
            assert reply.payload[-1] == 0  # QEMU checks the byte before the end


async def test_first_message_not_version_gets_error_and_disconnect(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            await peer.send(message(9, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0)))
            reply = await peer.recv()
            assert reply.is_error and reply.msg_id == 9 and reply.error_no == errno.EINVAL
            assert reply.size == HEADER_SIZE
            await peer.expect_eof()
        await settle(server)
        async with raw_connect(server.path) as peer:
            await peer.call(1, Command.DEVICE_RESET)


async def test_version_with_wrong_major_is_refused(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            await peer.send(message(3, Command.VERSION, struct.pack("<HH", 1, 0) + b"{}\0"))
            reply = await peer.recv()
            assert reply.is_error and reply.error_no == errno.ENOTSUP
            await peer.expect_eof()


async def test_version_with_descriptors_is_refused_and_they_are_closed(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        r, w = os.pipe()
        async with raw_connect(server.path, negotiate=False) as peer:
            await peer.send(message(3, Command.VERSION, QEMU_VERSION_PAYLOAD), [r, w])
            reply = await peer.recv()
            assert reply.is_error and reply.error_no == errno.EINVAL
            await peer.expect_eof()
        os.close(r)
        os.close(w)
        await settle(server)
        assert open_fds() == before


async def test_second_version_is_an_error_but_not_fatal(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            reply = await peer.call(5, Command.VERSION, QEMU_VERSION_PAYLOAD)
            assert reply.is_error and reply.error_no == errno.EINVAL
            reply = await peer.call(6, Command.REGION_READ, rd(BAR4, REG_MAGIC, 4))
            assert reply.payload[16:] == u32(MAGIC)


async def test_no_reply_commands_are_never_answered(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            nr = Flags.NO_REPLY
            # A posted write, a failing posted write, an unknown posted command.
            await peer.send(message(10, Command.REGION_WRITE, wr(BAR4, REG_SCRATCH, u32(0xABCD)), nr))
            await peer.send(message(11, Command.REGION_WRITE, wr(BAR4, 0x2000, u32(1)), nr))
            await peer.send(message(12, 99, b"", nr))
            await peer.send(message(13, Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 0, 0, 4096), nr))
            # The very next thing on the socket is the reply to this read, and it sees
            # the posted write (commands run in arrival order).
            await peer.send(message(14, Command.REGION_READ, rd(BAR4, REG_SCRATCH, 4)))
            reply = await peer.recv()
            assert (reply.msg_id, reply.cmd) == (14, Command.REGION_READ) and not reply.is_error
            assert reply.payload == rd(BAR4, REG_SCRATCH, 4) + u32(0xABCD)
        await settle(server)


async def test_region_info_two_step_query(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            first = await peer.call(1, Command.DEVICE_GET_REGION_INFO,
                                    struct.pack("<IIIIQQ", 32, 0, BAR0, 0, 0, 0))
            argsz, flags, index, cap_off, size, _ = struct.unpack("<IIIIQQ", first.payload)
            assert len(first.payload) == 32 and first.fds == ()
            assert argsz > 32 and index == BAR0 and size == fn.ram.size and cap_off == 0
            assert flags & C.VFIO_REGION_INFO_FLAG_MMAP and not flags & C.VFIO_REGION_INFO_FLAG_CAPS
            # QEMU sends only the fixed part again, with the bigger argsz.
            full = await peer.call(2, Command.DEVICE_GET_REGION_INFO,
                                   struct.pack("<IIIIQQ", argsz, 0, BAR0, 0, 0, 0))
            assert len(full.payload) == argsz and len(full.fds) == 1
            argsz2, flags, _, cap_off, size, offset = struct.unpack_from("<IIIIQQ", full.payload)
            assert argsz2 == argsz and flags & C.VFIO_REGION_INFO_FLAG_CAPS and cap_off == 32
            cid, _ver, nxt, nr = struct.unpack_from("<HHII", full.payload, cap_off)
            assert (cid, nxt, nr) == (C.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 0, 1)
            assert struct.unpack_from("<QQ", full.payload, cap_off + 16) == (0, size)
            with mmap.mmap(full.fds[0], size, mmap.MAP_SHARED, offset=offset) as mm:
                mm[100:104] = b"zpci"
                reply = await peer.call(3, Command.REGION_READ, rd(BAR0, 100, 4))
                assert reply.payload[16:] == b"zpci"
            os.close(full.fds[0])
            # The config region is never mappable; an odd BAR of a 64-bit pair has size 0.
            cfg = await peer.call(4, Command.DEVICE_GET_REGION_INFO,
                                  struct.pack("<IIIIQQ", 32, 0, CONFIG, 0, 0, 0))
            argsz, flags, _, _, size, _ = struct.unpack("<IIIIQQ", cfg.payload)
            assert (argsz, size, cfg.fds) == (32, 4096, ())
            assert not flags & C.VFIO_REGION_INFO_FLAG_MMAP
            odd = await peer.call(5, Command.DEVICE_GET_REGION_INFO,
                                  struct.pack("<IIIIQQ", 32, 0, 1, 0, 0, 0))
            assert struct.unpack("<IIIIQQ", odd.payload)[4] == 0


async def test_get_info_and_irq_info(sock_dir):
    async with memory_server(sock_dir, msix_vectors=8) as (fn, server):
        async with raw_connect(server.path) as peer:
            info = await peer.call(1, Command.DEVICE_GET_INFO, struct.pack("<IIII", 100, 0, 0, 0))
            argsz, flags, nregions, nirqs = struct.unpack("<IIII", info.payload)
            assert argsz == 16 and flags == C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET
            # QEMU: config index 7 must exist, MSI-X index 2 must exist.
            assert (nregions, nirqs) == (C.VFIO_PCI_NUM_REGIONS + 1, C.VFIO_PCI_NUM_IRQS)  # + zPCI region
            expect = {C.VFIO_PCI_INTX_IRQ_INDEX: 0, C.VFIO_PCI_MSI_IRQ_INDEX: 0,
                      C.VFIO_PCI_MSIX_IRQ_INDEX: 8, C.VFIO_PCI_ERR_IRQ_INDEX: 1,
                      C.VFIO_PCI_REQ_IRQ_INDEX: 1}
            for index, count in expect.items():
                r = await peer.call(10 + index, Command.DEVICE_GET_IRQ_INFO,
                                    struct.pack("<IIII", 16, 0, index, 0))
                argsz, flags, idx, n = struct.unpack("<IIII", r.payload)
                assert (argsz, idx, n) == (16, index, count)
                assert flags & C.VFIO_IRQ_INFO_EVENTFD
                assert bool(flags & C.VFIO_IRQ_INFO_MASKABLE) == (index == C.VFIO_PCI_MSIX_IRQ_INDEX)
            bad = await peer.call(20, Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 16, 0, 5, 0))
            assert bad.is_error and bad.error_no == errno.EINVAL


async def test_device_feature_is_not_offered(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            probe = C.VFIO_DEVICE_FEATURE_PROBE | C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_MIGRATION
            reply = await peer.call(1, Command.DEVICE_FEATURE, struct.pack("<II", 16, probe))
            assert reply.is_error and reply.error_no == errno.ENOTTY and reply.size == HEADER_SIZE
            get = C.VFIO_DEVICE_FEATURE_GET | 2
            reply = await peer.call(2, Command.DEVICE_FEATURE, struct.pack("<II", 16, get))
            assert reply.is_error and reply.error_no == errno.ENOTTY
            for cmd in (Command.MIG_DATA_READ, Command.MIG_DATA_WRITE):
                reply = await peer.call(3, cmd, struct.pack("<II", 16, 8))
                assert reply.is_error and reply.error_no == errno.EINVAL


async def test_device_reset(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            await peer.call(1, Command.REGION_WRITE, wr(BAR4, REG_SCRATCH, u32(0x55)))
            await peer.call(2, Command.REGION_WRITE, wr(CONFIG, 0x04, struct.pack("<H", 0x6)))
            assert fn.config.command == 0x6
            reply = await peer.call(3, Command.DEVICE_RESET)
            assert reply.is_reply and not reply.is_error and reply.size == HEADER_SIZE
            scratch = await peer.call(4, Command.REGION_READ, rd(BAR4, REG_SCRATCH, 4))
            assert scratch.payload[16:] == u32(0)
            assert fn.config.command == 0


async def test_dma_unmap_reply_echoes_the_request(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            m = await peer.call(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x10000, 0x1000))
            assert m.size == HEADER_SIZE and not m.is_error
            req = struct.pack("<IIQQ", 24, 0, 0x10000, 0x1000)
            reply = await peer.call(2, Command.DMA_UNMAP, req)
            assert reply.payload == req and len(fn.dma) == 0
            # QEMU's unmap-all form.
            await peer.call(3, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 1, 0, 0x20000, 0x1000))
            req = struct.pack("<IIQQ", 24, C.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0)
            reply = await peer.call(4, Command.DMA_UNMAP, req)
            assert reply.payload == req and len(fn.dma) == 0


async def test_region_write_multi(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            entries = [(BAR0, 0, b"\x01\x02"), (BAR0, 8, b"abcdefgh"), (BAR4, REG_SCRATCH, u32(7))]
            payload = struct.pack("<Q", len(entries)) + b"".join(
                struct.pack("<QII8s", off, region, len(d), d) for region, off, d in entries)
            reply = await peer.call(1, Command.REGION_WRITE_MULTI, payload)
            assert reply.payload == struct.pack("<Q", 3)
            assert fn.ram.mm[0:2] == b"\x01\x02" and fn.ram.mm[8:16] == b"abcdefgh"
            assert (await peer.call(2, Command.REGION_READ, rd(BAR4, REG_SCRATCH, 4))).payload[16:] == u32(7)


async def test_region_io_fds_offers_none(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            reply = await peer.call(1, Command.DEVICE_GET_REGION_IO_FDS, struct.pack("<IIII", 64, 0, BAR4, 0))
            assert reply.payload == struct.pack("<IIII", 16, 0, BAR4, 0) and reply.fds == ()


async def test_region_read_reply_carries_the_access_struct(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            cfg = await peer.call(1, Command.REGION_READ, rd(CONFIG, 0, 4096))
            assert cfg.payload[:16] == rd(CONFIG, 0, 4096) and len(cfg.payload) == 16 + 4096
            assert cfg.payload[16:20] == struct.pack("<HH", fn.config.u16(0), fn.config.u16(2))
            w = await peer.call(2, Command.REGION_WRITE, wr(BAR0, 4, b"xyz"))
            assert w.payload == struct.pack("<QII", 4, BAR0, 3)
            empty = await peer.call(3, Command.REGION_READ, rd(BAR0, 0, 0))
            assert empty.payload == rd(BAR0, 0, 0)


async def test_qemu_style_set_irqs_and_doorbell(sock_dir):
    """SET_IRQS with argsz 20 and the eventfds out of band, MSI-X enabled via the capability list."""
    from vfio_raw import find_capability
    from zpcid.vmm.client import read_eventfd
    from zpcid.devices.memory import REG_DOORBELL
    from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE

    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            efds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
            try:
                flags = C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER
                reply = await peer.call(1, Command.DEVICE_SET_IRQS,
                                        struct.pack("<IIIII", 20, flags, 2, 0, 4), efds)
                assert not reply.is_error and reply.size == HEADER_SIZE
                cfg = (await peer.call(2, Command.REGION_READ, rd(CONFIG, 0, 256))).payload[16:]
                cap = find_capability(cfg, PCI_CAP_ID_MSIX)
                await peer.call(3, Command.REGION_WRITE, wr(BAR4, REG_DOORBELL, u32(1)))
                assert [read_eventfd(fd) for fd in efds] == [0] * 4  # MSI-X not enabled yet
                await peer.call(4, Command.REGION_WRITE,
                                wr(CONFIG, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE)))
                await peer.call(5, Command.REGION_WRITE, wr(BAR4, REG_DOORBELL, u32(1)))
                assert [read_eventfd(fd) for fd in efds] == [0, 1, 0, 0]
            finally:
                for fd in efds:
                    os.close(fd)


async def test_client_without_fd_capacity_gets_no_mmappable_regions(sock_dir):
    """A VERSION with max_msg_fds 0: regions are offered through messages only."""
    from protocol.vfio_user import messages as M
    from zpcid.devices.memory import MemoryFunction
    from helpers import serving
    import zpcid.vmm.client as zc

    fn = MemoryFunction("nofd")
    caps = M.Capabilities(max_msg_fds=0)
    async with serving(fn, sock_dir) as srv:
        async with zc.connect(srv.path, caps=caps) as c:
            rm = await c.region_info(0)
            assert rm.mm is None and not rm.info.flags & C.VFIO_REGION_INFO_FLAG_MMAP
            assert not any(isinstance(cap, M.SparseMmapCap) for cap in rm.info.caps)
            await c.region_write(0, 0, b"via messages")
            assert await c.region_read(0, 0, 12) == b"via messages"
    fn.close()
