"""Hostile or broken VMM input: an error reply or that client alone is dropped; the daemon serves on."""

import collections
import gc
import errno
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st
import trio
import trio.testing

from helpers import mapping_count, open_fds
from vfio_raw import QEMU_VERSION_PAYLOAD, message, memory_server, raw_connect, settle

from protocol.vfio_user import consts as C
from protocol.vfio_user.header import HEADER, HEADER_SIZE, Command, Flags
from zpcid.devices.memory import MAGIC, REG_MAGIC
from zpcid.vfio_user.memfd import Memfd

BAR0, BAR4, CONFIG = 0, 4, C.VFIO_PCI_CONFIG_REGION_INDEX
EVENTFD_TRIGGER = C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER


def rd(region, offset, count):
    return struct.pack("<QII", offset, region, count)


def fd_census() -> collections.Counter:
    """What kinds of descriptors are open (sockets lose their inode number)."""
    # An earlier test's unreachable socket closed by a collection between two
    # censuses would look like a descriptor the daemon let go of or kept.
    gc.collect()
    kinds = collections.Counter()
    for fd in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # the directory listing's own descriptor
        kinds["socket" if target.startswith("socket:") else target] += 1
    return kinds


async def still_serves(server):
    """The next client negotiates and gets real answers."""
    await settle(server)
    async with raw_connect(server.path) as peer:
        reply = await peer.call(77, Command.REGION_READ, rd(BAR4, REG_MAGIC, 4))
        assert reply.payload[16:] == struct.pack("<I", MAGIC)
    await settle(server)


async def expect_error(peer, msg_id, cmd, payload=b"", fds=(), err=errno.EINVAL, flags=0):
    reply = await peer.call(msg_id, cmd, payload, fds, flags)
    assert reply.is_error and reply.is_reply, reply
    assert reply.error_no == err and reply.size == HEADER_SIZE
    return reply


async def test_unknown_commands(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            for i, cmd in enumerate((0, 14, 19, 0xFFFF)):
                await expect_error(peer, i, cmd, b"abc", err=errno.ENOSYS)
            # Server-to-client commands are not accepted from a client.
            await expect_error(peer, 9, Command.DMA_READ, struct.pack("<QQ", 0, 8))
            await expect_error(peer, 10, Command.DMA_WRITE, struct.pack("<QQ", 0, 1) + b"x")
            reply = await peer.call(11, Command.REGION_READ, rd(BAR4, REG_MAGIC, 4))
            assert not reply.is_error


@pytest.mark.parametrize("flags", [0x40, 0x2, 0xF, Flags.ERROR, 0x80000000])
async def test_bad_header_flags(sock_dir, flags):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            await peer.send(message(1, Command.DEVICE_RESET, b"", flags))
            reply = await peer.recv()
            assert reply.is_error and reply.error_no == errno.EINVAL and reply.msg_id == 1
        await still_serves(server)


ARGSZ_LIES = [
    (Command.DEVICE_GET_INFO, struct.pack("<IIII", 8, 0, 0, 0)),
    (Command.DEVICE_GET_INFO, b""),                                   # no payload at all
    (Command.DEVICE_GET_REGION_INFO, struct.pack("<IIIIQQ", 16, 0, 0, 0, 0, 0)),
    (Command.DEVICE_GET_REGION_INFO, struct.pack("<III", 32, 0, 0)),  # truncated request
    (Command.DEVICE_GET_IRQ_INFO, struct.pack("<IIII", 4, 0, 2, 0)),
    (Command.DMA_MAP, struct.pack("<IIQQQ", 16, 3, 0, 0x1000, 0x1000)),
    (Command.DMA_UNMAP, struct.pack("<IIQQ", 8, 0, 0x1000, 0x1000)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 8, EVENTFD_TRIGGER, 2, 0, 1)),
    (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, C.VFIO_IRQ_SET_DATA_BOOL
                                          | C.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 3) + b"\1"),
    (Command.REGION_WRITE, struct.pack("<QII", 0, BAR0, 8) + b"four"),  # count != data
    (Command.REGION_READ, struct.pack("<QII", 0, BAR0, 4) + b"junk"),
]


@pytest.mark.parametrize("cmd,payload", ARGSZ_LIES)
async def test_argsz_and_length_lies(sock_dir, cmd, payload):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            await expect_error(peer, 1, cmd, payload)
            assert len(fn.dma) == 0 and fn.irqs.installed() == 0
            reply = await peer.call(2, Command.REGION_READ, rd(BAR4, REG_MAGIC, 4))
            assert not reply.is_error


async def test_region_access_out_of_range(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            size = fn.ram.size
            await expect_error(peer, 1, Command.REGION_READ, rd(BAR0, size - 4, 8))
            await expect_error(peer, 2, Command.REGION_READ, rd(BAR0, (1 << 64) - 4, 8))
            await expect_error(peer, 3, Command.REGION_WRITE,
                               struct.pack("<QII", size, BAR0, 1) + b"x")
            await expect_error(peer, 4, Command.REGION_READ, rd(CONFIG, 4095, 2))
            await expect_error(peer, 5, Command.REGION_READ, rd(3, 0, 4))    # unimplemented BAR
            await expect_error(peer, 6, Command.REGION_READ, rd(99, 0, 4))   # no such region
            await expect_error(peer, 7, Command.DEVICE_GET_REGION_INFO,
                               struct.pack("<IIIIQQ", 32, 0, 99, 0, 0, 0))
            await expect_error(peer, 8, Command.REGION_READ, rd(BAR0, 0, (1 << 20) + 1), err=errno.E2BIG)
            reply = await peer.call(9, Command.REGION_READ, rd(BAR0, size - 4, 4))
            assert not reply.is_error and len(reply.payload) == 20


async def test_wrong_fd_counts(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        gc.collect()
        before = open_fds()
        with Memfd(1 << 16, "zpcid-test-guest") as guest:
            census = fd_census()  # after the memfd (and its mmap's own descriptor) exist
            async with raw_connect(server.path) as peer:
                # DMA_MAP takes at most one fd.
                await expect_error(peer, 1, Command.DMA_MAP,
                                   struct.pack("<IIQQQ", 32, 3, 0, 0, 0x1000), [guest.fd, guest.fd])
                assert len(fn.dma) == 0
                # SET_IRQS: fds must match count; fds without DATA_EVENTFD are refused.
                efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
                await expect_error(peer, 2, Command.DEVICE_SET_IRQS,
                                   struct.pack("<IIIII", 20, EVENTFD_TRIGGER, 2, 0, 1), efds[:2])
                await expect_error(peer, 3, Command.DEVICE_SET_IRQS,
                                   struct.pack("<IIIII", 20, C.VFIO_IRQ_SET_DATA_NONE
                                               | C.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 1), efds[:1])
                await expect_error(peer, 4, Command.DEVICE_SET_IRQS,
                                   struct.pack("<IIIII", 20, EVENTFD_TRIGGER, 2, 3, 2), efds[:2])
                assert fn.irqs.installed() == 0
                # Commands that take no fds still work; the stray ones are closed.
                reply = await peer.call(5, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0),
                                        efds)
                assert not reply.is_error
                for fd in efds:
                    os.close(fd)
                # The daemon closes stray fds after replying; one more round trip
                # makes sure it got there.
                await peer.call(6, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
                # None of the refused or stray descriptors is still held by the daemon.
                assert fd_census() - census == {"socket": 2}  # the connection's two ends
                assert census - fd_census() == {}
                assert mapping_count("zpcid-test-guest") == 1  # only our own mapping
        await settle(server)
        assert open_fds() == before


@pytest.mark.parametrize("size", [0, 8, HEADER_SIZE - 1, (1 << 20) + 4096, 0xFFFFFFFF])
async def test_bad_msg_size_drops_only_that_client(sock_dir, size):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            await peer.send(HEADER.pack(1, Command.REGION_READ, size, 0, 0) + rd(BAR4, 0, 4))
            await peer.expect_eof()
        await still_serves(server)


async def test_truncated_header_then_close(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path) as peer:
            await peer.send(message(1, Command.DEVICE_RESET)[:9])
        await still_serves(server)


async def test_client_vanishing_mid_message_leaks_nothing(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        with Memfd(1 << 16, "zpcid-test-guest") as guest:
            async with raw_connect(server.path) as peer:
                await peer.call(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 1 << 16), [guest.fd])
                # Half a DMA_MAP with its fd, then gone.
                whole = message(2, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 1 << 20, 1 << 16))
                await peer.send(whole[:30], [guest.fd])
            await settle(server)
            assert mapping_count("zpcid-test-guest") == 1  # ours only
            assert len(fn.dma) == 0
        assert open_fds() == before
        await still_serves(server)


async def test_fds_arriving_without_a_message_start_drop_the_client(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        async with raw_connect(server.path) as peer:
            whole = message(2, Command.REGION_READ, rd(BAR4, 0, 4))
            await peer.send(whole[:20])
            # Only once the daemon has read these bytes on their own do the fds below
            # arrive without a message start (else Linux would deliver both together).
            await trio.testing.wait_all_tasks_blocked()  # the daemon read them and waits for more
            assert server.endpoint.framer.buffered == 20
            r, w = os.pipe()
            await peer.send(whole[20:], [r])
            os.close(r)
            os.close(w)
            await peer.expect_eof()
        await settle(server)
        assert open_fds() == before
        await still_serves(server)


async def test_dma_map_limits(sock_dir):
    async with memory_server(sock_dir, max_dma_maps=4) as (fn, server):
        with Memfd(1 << 16, "zpcid-test-guest") as guest:
            async with raw_connect(server.path) as peer:
                ro = os.open(f"/proc/self/fd/{guest.fd}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    # Writable map with a read-only descriptor.
                    await expect_error(peer, 1, Command.DMA_MAP,
                                       struct.pack("<IIQQQ", 32, 3, 0, 0, 0x1000), [ro], err=errno.EACCES)
                finally:
                    os.close(ro)
                # Beyond the end of the file, unaligned file offset.
                await expect_error(peer, 2, Command.DMA_MAP,
                                   struct.pack("<IIQQQ", 32, 3, 0xF000, 0, 0x2000), [guest.fd])
                await expect_error(peer, 3, Command.DMA_MAP,
                                   struct.pack("<IIQQQ", 32, 3, 0x10, 0, 0x1000), [guest.fd])
                # The map-count limit.
                for i in range(4):
                    await peer.call(10 + i, Command.DMA_MAP,
                                    struct.pack("<IIQQQ", 32, 3, 0, i << 20, 0x1000))
                await expect_error(peer, 20, Command.DMA_MAP,
                                   struct.pack("<IIQQQ", 32, 3, 0, 9 << 20, 0x1000), err=errno.ENOSPC)
                # Overlap.
                await expect_error(peer, 21, Command.DMA_MAP,
                                   struct.pack("<IIQQQ", 32, 3, 0, 0x800, 0x1000), err=errno.EEXIST)
                assert len(fn.dma) == 4


async def test_second_version_payload_garbage_does_not_crash(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            deep = struct.pack("<HH", 0, 0) + b"[" * 100_000 + b"]" * 100_000 + b"\0"
            await peer.send(message(1, Command.VERSION, deep))
            reply = await peer.recv()
            assert reply.is_error and reply.error_no == errno.EINVAL
            await peer.expect_eof()
        await still_serves(server)
        async with raw_connect(server.path, negotiate=False) as peer:
            await peer.send(message(1, Command.VERSION, QEMU_VERSION_PAYLOAD[:-1]))  # no NUL
            assert (await peer.recv()).error_no == errno.EINVAL
            await peer.expect_eof()


async def test_fatal_header_behind_a_message_with_fds_leaks_nothing(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        r, w = os.pipe()
        async with raw_connect(server.path) as peer:
            whole = message(2, Command.DEVICE_GET_INFO, struct.pack("<IIII", 16, 0, 0, 0))
            await peer.send(whole[:8], [r])
            await trio.testing.wait_all_tasks_blocked()  # the daemon read them and waits for more
            assert server.endpoint.framer.buffered == 8
            # The message completes, but a header with an impossible size follows it.
            await peer.send(whole[8:] + HEADER.pack(3, Command.DEVICE_RESET, 3, 0, 0))
            await peer.expect_eof()
        os.close(r)
        os.close(w)
        await settle(server)
        assert open_fds() == before


async def test_client_vanishing_during_message_dma_fails_the_dma_at_once(sock_dir, autojump_clock):
    import zpcid.vfio_user.endpoint
    from zpcid.devices.memory import DMA_CMD_TO_HOST, REG_DMA_ADDR, REG_DMA_CMD, REG_DMA_LEN

    # On the mock clock the reply timeout would pass at once in real time; the
    # virtual time shows the DMA ended by the EOF, well before that timeout.
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        async with raw_connect(server.path) as peer:
            await peer.call(1, Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0x10000, 0x1000))
            for i, (off, val) in enumerate(((REG_DMA_ADDR, 0x10000), (REG_DMA_LEN, 64))):
                await peer.call(2 + i, Command.REGION_WRITE,
                                struct.pack("<QII", off, BAR4, 4) + struct.pack("<I", val))
            await peer.send(message(9, Command.REGION_WRITE,
                                    struct.pack("<QII", REG_DMA_CMD, BAR4, 4)
                                    + struct.pack("<I", DMA_CMD_TO_HOST)))
            # The register write's reply and the device's DMA request, in either order.
            got = {(m.cmd, m.is_reply): m for m in [await peer.recv(), await peer.recv()]}
            request = got[(Command.DMA_WRITE, False)]
            assert (Command.REGION_WRITE, True) in got
            assert struct.unpack_from("<QQ", request.payload) == (0x10000, 64)
            # ...and we leave without answering it.
            t0 = trio.current_time()
        await settle(server)
        assert trio.current_time() - t0 < zpcid.vfio_user.endpoint.DMA_REPLY_TIMEOUT / 2
        assert len(fn.dma) == 0 and open_fds() == before
        await still_serves(server)


async def test_a_client_that_never_reads_is_dropped(sock_dir, monkeypatch):
    """Replies back up, commands pile up behind them; past the budget the client goes."""
    import zpcid.vfio_user.endpoint

    monkeypatch.setattr(zpcid.vfio_user.endpoint, "MAX_QUEUED_BYTES", 16 << 10)
    async with memory_server(sock_dir) as (fn, server):
        before = open_fds()
        async with raw_connect(server.path) as peer:
            r, w = os.pipe()
            n = 2000
            with trio.fail_after(10):  # without the budget this would block for good
                try:
                    for i in range(n):
                        # 64 KiB replies fill the socket buffer within a few commands.
                        await peer.send(message(100 + i, Command.REGION_READ, rd(BAR0, 0, 64 << 10)),
                                        [r] if i % 100 == 0 else [])  # dropped fds: closed too
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the daemon hung up on us mid-burst
            os.close(r)
            os.close(w)
            seen = []
            while True:
                try:
                    seen.append((await peer.recv()).msg_id)
                except EOFError:
                    break
            # What was queued within budget was answered in order, then the daemon hung up.
            assert seen == list(range(100, 100 + len(seen))) and len(seen) < n
        await settle(server)
        assert open_fds() == before
        await still_serves(server)


_garbage_messages = st.lists(
    st.tuples(st.integers(0, 20), st.sampled_from([0, 0, 0, 0x10, 0x1, 0x20, 0x40]),
              st.binary(max_size=48)),
    min_size=1, max_size=25,
)


@settings(max_examples=25, deadline=None)
@given(_garbage_messages, st.booleans())
def test_random_command_streams_never_hurt_the_daemon(msgs, read_replies):
    """Arbitrary commands with arbitrary payloads, then a hang-up: the next client is fine."""
    import shutil
    import tempfile

    async def body(sock_dir):
        async with memory_server(sock_dir) as (fn, server):
            before = open_fds()
            async with raw_connect(server.path) as peer:
                for i, (cmd, flags, payload) in enumerate(msgs):
                    await peer.send(message(i, cmd, payload, flags))
                if read_replies:
                    # Whatever comes back is well framed and answers our ids.
                    await peer.send(message(999, Command.DEVICE_GET_INFO,
                                            struct.pack("<IIII", 16, 0, 0, 0)))
                    while True:
                        reply = await peer.recv()
                        for fd in reply.fds:
                            os.close(fd)
                        if reply.msg_id == 999 and reply.cmd == Command.DEVICE_GET_INFO:
                            break
                        if not reply.is_reply:  # a DMA request from the device: refuse it
                            assert reply.cmd in (Command.DMA_READ, Command.DMA_WRITE)
                            await peer.send(HEADER.pack(reply.msg_id, reply.cmd, HEADER_SIZE,
                                                        Flags.REPLY | Flags.ERROR, errno.EFAULT))
                            continue
                        assert reply.msg_id < len(msgs)
            await settle(server)
            assert open_fds() == before and len(fn.dma) == 0 and fn.irqs.installed() == 0
            await still_serves(server)

    d = tempfile.mkdtemp(prefix="zpcid-t")
    try:
        trio.run(body, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
