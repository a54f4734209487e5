"""FunctionServer: one client at a time, pipelined boot traffic, a clean function after each client."""

import errno
import os
import socket
import struct

import pytest
import trio

import zpcid.vmm.client
from helpers import mapping_count, open_fds
from vfio_raw import find_capability, message, memory_server, raw_connect, settle

from protocol.vfio_user import consts as C
from protocol.vfio_user.header import Command
from zpcid.vmm.client import read_eventfd, wait_eventfd
from zpcid.devices.memory import REG_DOORBELL, REG_SCRATCH
from zpcid.vfio_user.memfd import Memfd
from zpcid.pci.config import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE
from zpcid.vfio_user.server import SocketInUse, bind_unix

GUEST = "zpcid-test-guest"
MSIX = C.VFIO_PCI_MSIX_IRQ_INDEX


async def test_second_client_is_refused_while_the_first_keeps_working(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as first:
            await first.region_write(4, REG_SCRATCH, b"\x01\x00\x00\x00")
            async with raw_connect(server.path, negotiate=False) as second:
                await second.send(message(0x77, Command.VERSION, struct.pack("<HH", 0, 0) + b"{}\0"))
                reply = await second.recv()
                assert reply.is_error and reply.msg_id == 0x77 and reply.error_no == errno.EBUSY
                await second.expect_eof()
            assert server.refused == 1
            # The first session did not notice.
            assert await first.region_read(4, REG_SCRATCH, 4) == b"\x01\x00\x00\x00"
            assert server.endpoint is not None and fn.session is server.endpoint


async def test_refused_client_that_sends_nothing_is_hung_up_on(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as first:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.connect(server.path)
            sock.shutdown(socket.SHUT_WR)
            with trio.fail_after(5):
                assert await sock.recv(16) == b""
            sock.close()
            await first.get_info()


async def test_pipelined_dma_map_burst(sock_dir):
    """QEMU's boot: dozens of DMA_MAPs before any reply is read, mostly for one memfd."""
    async with memory_server(sock_dir) as (fn, server):
        with Memfd(64 << 20, GUEST) as guest:
            maps_before = mapping_count(GUEST)  # the test's own mapping of guest RAM
            async with raw_connect(server.path) as peer:
                n, ids = 48, []
                for i in range(n):
                    iova, size = i << 20, 1 << 20
                    with_fd = i % 4 != 3
                    payload = struct.pack("<IIQQQ", 32, 3 if i % 5 else 1,
                                          iova if with_fd else 0, iova, size)
                    await peer.send(message(1000 + i, Command.DMA_MAP, payload),
                                    [guest.fd] if with_fd else [])
                    ids.append(1000 + i)
                got = []
                for _ in range(n):
                    reply = await peer.recv()
                    assert reply.cmd == Command.DMA_MAP and not reply.is_error, reply
                    got.append(reply.msg_id)
                assert got == ids
                assert len(fn.dma) == n
                # One mapping of the memfd however many DMA_MAPs referenced it.
                assert fn.dma.file_count == 1
                assert mapping_count(GUEST) == maps_before + 1
                # The device sees guest memory through it.
                guest.write(5 << 20, b"guest")
                assert await fn.dma.read(5 << 20, 5) == b"guest"
                # QEMU's whole-window unmap at IOMMU re-attach.
                unmap = struct.pack("<IIQQ", 24, 0, 0, 1 << 40)
                reply = await peer.call(5000, Command.DMA_UNMAP, unmap)
                assert not reply.is_error and len(fn.dma) == 0
                assert fn.dma.file_count == 0 and mapping_count(GUEST) == maps_before


async def test_dma_unmap_semantics(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        with Memfd(1 << 20, GUEST) as guest:
            async with zpcid.vmm.client.connect(server.path) as c:
                # Nothing mapped: a huge window succeeds.
                await c.dma_unmap(0, 1 << 63)
                await c.dma_map(0x100000, 0x10000, guest.fd, 0)
                with pytest.raises(zpcid.vmm.client.VfioUserError) as ei:
                    await c.dma_unmap(0x100000, 0x1000)  # would split
                assert ei.value.errno == errno.EINVAL
                with pytest.raises(zpcid.vmm.client.VfioUserError) as ei:
                    await c.dma_map(0x108000, 0x10000, guest.fd, 0)
                assert ei.value.errno == errno.EEXIST
                with pytest.raises(zpcid.vmm.client.VfioUserError) as ei:
                    await c.dma_map(0xF8000, 0x10000)
                assert ei.value.errno == errno.EEXIST
                # An exact repeat of a live mapping is accepted (libvfio-user does the same).
                await c.dma_map(0x100000, 0x10000, guest.fd, 0)
                assert len(fn.dma) == 1
                await c.dma_unmap(0, 1 << 40)
                assert len(fn.dma) == 0


async def test_next_client_sees_a_reset_function_and_nothing_leaks(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        fds_before = open_fds()
        with Memfd(4 << 20, GUEST) as guest:
            maps_before = mapping_count(GUEST)
            async with zpcid.vmm.client.connect(server.path) as c:
                for i in range(4):
                    await c.dma_map(i << 20, 1 << 20, guest.fd, i << 20)
                await c.dma_map(8 << 20, 1 << 20)  # message mode
                efds = await c.enable_irq_eventfds(MSIX, 4)
                err = await c.enable_irq_eventfds(C.VFIO_PCI_ERR_IRQ_INDEX, 1)
                cfg = await c.region_read(7, 0, 256)
                cap = find_capability(cfg, PCI_CAP_ID_MSIX)
                await c.region_write(7, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))
                await c.region_write(4, REG_SCRATCH, b"\xAA\0\0\0")
                await c.region_info(0)  # mmaps BAR0 through the received fd
                assert fn.irqs.installed() == 5 and fn.dma.file_count == 1 and fn.msix.enabled
            await settle(server)
            for fd in efds + err:
                os.close(fd)
            assert mapping_count(GUEST) == maps_before
        # The server closed its copies of the eventfds and the memfd, and unmapped it.
        assert open_fds() == fds_before
        assert fn.irqs.installed() == 0 and len(fn.dma) == 0 and fn.dma.file_count == 0
        async with zpcid.vmm.client.connect(server.path) as c:
            cfg = await c.region_read(7, 0, 256)
            cap = find_capability(cfg, PCI_CAP_ID_MSIX)
            assert struct.unpack_from("<H", cfg, cap + 2)[0] & PCI_MSIX_FLAGS_ENABLE == 0
            assert struct.unpack_from("<H", cfg, 4)[0] == 0  # command register
            assert await c.region_read(4, REG_SCRATCH, 4) == bytes(4)
            assert fn.counters.attaches == 2


async def test_session_crash_of_one_client_does_not_stop_the_socket(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        for _ in range(3):
            async with raw_connect(server.path, negotiate=False) as peer:
                await peer.send(message(1, Command.DEVICE_RESET))
                assert (await peer.recv()).is_error
                await peer.expect_eof()
            await settle(server)
        async with zpcid.vmm.client.connect(server.path) as c:
            await c.reset()


async def test_request_release_signals_req_then_forces(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        assert await server.request_release(0.01) is True  # nobody attached
        async with zpcid.vmm.client.connect(server.path) as c:
            (req,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)
            try:
                left = await server.request_release(0.2)
                assert left is False and not server.attached
                assert read_eventfd(req) == 1
                with pytest.raises((ConnectionError, OSError)):
                    await c.get_info()
            finally:
                os.close(req)
        await settle(server)
        async with zpcid.vmm.client.connect(server.path) as c:
            await c.get_info()


async def test_request_release_client_cooperates(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with trio.open_nursery() as nursery:
            async def vmm(task_status=trio.TASK_STATUS_IGNORED):
                async with zpcid.vmm.client.connect(server.path) as c:
                    (req,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)
                    task_status.started()
                    await wait_eventfd(req)
                    os.close(req)

            await nursery.start(vmm)
            assert await server.request_release(5.0) is True


async def test_msix_doorbell_end_to_end(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with zpcid.vmm.client.connect(server.path) as c:
            efds = await c.enable_irq_eventfds(MSIX, 4)
            try:
                cfg = await c.region_read(7, 0, 256)
                cap = find_capability(cfg, PCI_CAP_ID_MSIX)
                await c.region_write(4, REG_DOORBELL, struct.pack("<I", 2))
                assert [read_eventfd(fd) for fd in efds] == [0, 0, 0, 0]  # MSI-X still off
                await c.region_write(7, cap + 2, struct.pack("<H", PCI_MSIX_FLAGS_ENABLE))
                await c.region_write(4, REG_DOORBELL, struct.pack("<I", 2))
                assert [read_eventfd(fd) for fd in efds] == [0, 0, 1, 0]
            finally:
                for fd in efds:
                    os.close(fd)


async def test_bind_unix_replaces_stale_socket_but_not_live_one(sock_dir):
    path = os.path.join(sock_dir, "s.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    live = bind_unix(path)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        with pytest.raises(SocketInUse):
            bind_unix(path)
    finally:
        live.close()
    other = os.path.join(sock_dir, "plain")
    open(other, "w").close()
    with pytest.raises(SocketInUse):
        bind_unix(other)


async def test_socket_file_removed_when_serving_stops(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        assert os.path.exists(server.path)
    assert not os.path.exists(server.path)
