"""Timeout and retry paths, on trio's mock clock (autojump: virtual time passes
whenever every task waits, so the waits below cost no real time).

Each test measures virtual time with ``trio.current_time()``; a short slack
allows for the few clock jumps that unrelated waits may add.
"""

import errno
import os
import socket
import struct

import pytest
import trio

import zpcid.vmm.client as zclient
from protocol.vfio_user import consts as C
from protocol.vfio_user.header import Command
from vfio_raw import QEMU_VERSION_PAYLOAD, message, memory_server, raw_connect, settle
from zpcid.devices.memory import (DMA_CMD_TO_HOST, DMA_STATUS_BUSY, DMA_STATUS_FAULT, REG_DMA_ADDR,
                                  REG_DMA_CMD, REG_DMA_LEN, REG_DMA_STATUS)
from zpcid.vfio_user import endpoint, server as server_mod

BAR4 = 4
SLACK = 0.05


def since(t0: float) -> float:
    return trio.current_time() - t0


async def test_a_vmm_that_reconnects_within_the_handover_window_gets_the_function(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with trio.open_nursery() as nursery:
            first_left = trio.Event()

            async def first_vmm(task_status=trio.TASK_STATUS_IGNORED):
                async with zclient.connect(server.path):
                    task_status.started()
                    # Hang up a little later than the new connection arrives.
                    await trio.sleep(server_mod.HANDOVER_TIMEOUT * 0.6)
                first_left.set()

            await nursery.start(first_vmm)
            t0 = trio.current_time()
            async with raw_connect(server.path, negotiate=False) as second:
                await second.send(message(1, Command.VERSION, QEMU_VERSION_PAYLOAD))
                reply = await second.recv()
                assert not reply.is_error and reply.msg_id == 1
                assert first_left.is_set()
                assert since(t0) < server_mod.HANDOVER_TIMEOUT
            assert server.refused == 0


async def test_a_second_vmm_is_refused_when_the_handover_window_closes(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with zclient.connect(server.path) as first:
            t0 = trio.current_time()
            async with raw_connect(server.path, negotiate=False) as second:
                await second.send(message(7, Command.VERSION, QEMU_VERSION_PAYLOAD))
                reply = await second.recv(timeout=60)
                assert reply.is_error and reply.error_no == errno.EBUSY and reply.msg_id == 7
                waited = since(t0)
                assert server_mod.HANDOVER_TIMEOUT <= waited <= server_mod.HANDOVER_TIMEOUT + SLACK
                await second.expect_eof()
            assert server.refused == 1
            await first.get_info()  # the first VMM kept its function


async def test_a_refused_vmm_that_says_nothing_is_hung_up_on_after_the_refuse_timeout(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with zclient.connect(server.path) as first:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with sock:
                await sock.connect(server.path)
                t0 = trio.current_time()
                with trio.fail_after(60):
                    assert await sock.recv(16) == b""
                expected = server_mod.HANDOVER_TIMEOUT + server_mod.REFUSE_TIMEOUT
                assert expected <= since(t0) <= expected + SLACK
            await first.get_info()


async def test_release_request_is_forced_when_the_timeout_expires(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with zclient.connect(server.path) as c:
            (req,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)
            try:
                t0 = trio.current_time()
                assert await server.request_release(30.0) is False  # the VMM ignores REQ
                assert 30.0 <= since(t0) <= 30.0 + SLACK
                assert zclient.read_eventfd(req) == 1 and not server.attached
            finally:
                os.close(req)


async def test_release_request_without_a_req_eventfd_is_forced_at_once(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with zclient.connect(server.path):
            t0 = trio.current_time()
            assert await server.request_release(30.0) is False  # nobody could hear it
            assert since(t0) <= SLACK and not server.attached


async def test_release_request_ends_when_the_vmm_lets_go(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with trio.open_nursery() as nursery:
            async def vmm(task_status=trio.TASK_STATUS_IGNORED):
                async with zclient.connect(server.path) as c:
                    (req,) = await c.enable_irq_eventfds(C.VFIO_PCI_REQ_IRQ_INDEX, 1)
                    task_status.started()
                    await zclient.wait_eventfd(req, timeout=60)
                    os.close(req)
                    await trio.sleep(3.0)  # the guest takes its time to release the device

            await nursery.start(vmm)
            t0 = trio.current_time()
            assert await server.request_release(30.0) is True
            assert 3.0 <= since(t0) <= 3.0 + SLACK


async def test_an_unanswered_dma_request_fails_after_the_reply_timeout(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            # Message-mode memory: the device must ask the client for every access.
            await peer.call(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x10000, 0x1000))
            for i, (off, val) in enumerate(((REG_DMA_ADDR, 0x10000), (REG_DMA_LEN, 64))):
                await peer.call(2 + i, Command.REGION_WRITE,
                                struct.pack("<QII", off, BAR4, 4) + struct.pack("<I", val))
            t0 = trio.current_time()
            await peer.send(message(9, Command.REGION_WRITE,
                                    struct.pack("<QII", REG_DMA_CMD, BAR4, 4) + struct.pack("<I", DMA_CMD_TO_HOST)))
            got = {(m.cmd, m.is_reply) for m in [await peer.recv(), await peer.recv()]}
            assert got == {(Command.REGION_WRITE, True), (Command.DMA_WRITE, False)}
            # The DMA request stays unanswered; the device gives up after the timeout.
            status = await peer.call(10, Command.REGION_READ, struct.pack("<QII", REG_DMA_STATUS, BAR4, 4))
            assert struct.unpack_from("<I", status.payload, 16)[0] == DMA_STATUS_BUSY
            await trio.sleep(endpoint.DMA_REPLY_TIMEOUT + SLACK)
            status = await peer.call(11, Command.REGION_READ, struct.pack("<QII", REG_DMA_STATUS, BAR4, 4))
            assert struct.unpack_from("<I", status.payload, 16)[0] == DMA_STATUS_FAULT
            assert since(t0) <= endpoint.DMA_REPLY_TIMEOUT + 2 * SLACK
            # The session goes on.
            reply = await peer.call(12, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
            assert not reply.is_error
        await settle(server)


async def test_the_reference_client_gives_up_on_a_server_that_never_answers(sock_dir, autojump_clock):
    path = os.path.join(sock_dir, "mute.sock")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(path)
        listener.listen(1)
        t0 = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            async with zclient.connect(path):  # VERSION is never answered
                pass
        assert zclient.REPLY_TIMEOUT <= since(t0) <= zclient.REPLY_TIMEOUT + SLACK


async def test_waiting_for_an_interrupt_times_out(autojump_clock):
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        t0 = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await zclient.wait_eventfd(fd, timeout=7.0)
        assert 7.0 <= since(t0) <= 7.0 + SLACK
        os.eventfd_write(fd, 3)
        assert await zclient.wait_eventfd(fd, timeout=7.0) == 3
    finally:
        os.close(fd)
