"""The Endpoint over an in-memory Transport (tests/memory_transport.py), driven by a sans-I/O
client Connection: the message path without a socket, including a send buffer of a few bytes."""

import contextlib
import errno
import struct

import trio

from helpers import open_fds
from memory_transport import transport_pair
from protocol.vfio_user import messages as M
from protocol.vfio_user.connection import Connection, Reply, Request, Role
from protocol.vfio_user.header import Command
from zpcid.devices.memory import (DMA_CMD_FROM_HOST, DMA_CMD_TO_HOST, MAGIC, REG_DMA_ADDR, REG_DMA_CMD,
                                  REG_DMA_LEN, REG_DMA_STATUS, REG_MAGIC, REG_SCRATCH, MemoryFunction)
from zpcid.vfio_user.endpoint import Endpoint
from zpcid.vfio_user.memfd import Memfd

BAR4 = 4
WAIT = 5.0


def rd(offset, count, region=BAR4):
    return struct.pack("<QII", offset, region, count)


def wr(offset, data, region=BAR4):
    return struct.pack("<QII", offset, region, len(data)) + data


class Peer:
    """The client side: a Connection and the in-memory transport, no reader task."""

    def __init__(self, transport):
        self.t = transport
        self.conn = Connection(Role.CLIENT, M.Capabilities(max_data_xfer_size=1 << 16))
        self.events: list = []

    async def next_event(self):
        while not self.events:
            data, fds = await self.t.recv()
            if not data:
                raise EOFError
            self.events += self.conn.receive_data(data, fds)
        return self.events.pop(0)

    async def send(self, cmd, payload=b"", fds=(), no_reply=False):
        msg_id, data = self.conn.send_request(cmd, payload, no_reply=no_reply, token=cmd)
        await self.t.send([data], fds)
        return msg_id

    async def call(self, cmd, payload=b"", fds=()):
        msg_id = await self.send(cmd, payload, fds)
        ev = await self.next_event()
        assert isinstance(ev, Reply) and ev.msg.header.msg_id == msg_id, ev
        return ev.msg

    async def negotiate(self):
        msg_id, data = self.conn.version_request(token="v")
        await self.t.send([data])
        self.conn.version_accepted(await self.next_event())


@contextlib.asynccontextmanager
async def session(capacity=1 << 20):
    fn = MemoryFunction("m")
    server_side, client_side = transport_pair(capacity)
    ep = Endpoint(server_side, fn, name="m")
    fn.attach(ep)
    try:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run():
                await ep.run()
                done.set()

            nursery.start_soon(run)
            peer = Peer(client_side)
            await peer.negotiate()
            yield fn, ep, peer, done
            await client_side.aclose()
            with trio.fail_after(WAIT):
                await done.wait()
    finally:
        fn.detach()
        fn.close()


async def test_a_session_over_the_memory_transport():
    before = open_fds()
    async with session() as (fn, ep, peer, done):
        reply = await peer.call(Command.REGION_READ, rd(REG_MAGIC, 4))
        assert reply.payload == rd(REG_MAGIC, 4) + struct.pack("<I", MAGIC)
        await peer.send(Command.REGION_WRITE, wr(REG_SCRATCH, b"\x11\x22\x33\x44"), no_reply=True)
        reply = await peer.call(Command.REGION_READ, rd(REG_SCRATCH, 4))
        assert reply.payload[16:] == b"\x11\x22\x33\x44"
        with Memfd(1 << 16, "zpcid-test") as mem:
            await peer.call(Command.DMA_MAP, M.DmaMap(32, 3, 0, 0x10000, 1 << 16).pack(), [mem.fd])
            assert len(fn.dma) == 1
        bad = await peer.call(Command.REGION_READ, rd(0, 1 << 21))
        assert bad.header.is_error and bad.header.error_no == errno.E2BIG
        assert ep.stats.messages == 5 and ep.stats.errors == 1
    assert done.is_set() and open_fds() == before


async def test_replies_queue_in_order_behind_a_full_send_buffer():
    """A 40-byte 'socket': replies never wait for the client, and leave in order."""
    async with session(capacity=40) as (fn, ep, peer, done):
        ids = [await peer.send(Command.REGION_READ, rd(REG_MAGIC, 4)) for _ in range(50)]
        with trio.fail_after(WAIT):
            while ep.stats.messages < 50:
                await trio.sleep(0)
        assert ep.transport.queued > 0  # the endpoint went on serving past the full buffer
        got = [(await peer.next_event()).msg for _ in ids]
        assert [m.header.msg_id for m in got] == ids
        assert all(m.payload[16:] == struct.pack("<I", MAGIC) for m in got)


async def test_a_handler_waiting_on_a_dma_reply_reads_it_itself():
    """Without a session nursery the memory device runs its DMA inside the register
    write: the connection task is the one waiting for DMA_WRITE's reply, so it must
    read it; the command sent meanwhile is served after, in order."""
    async with session() as (fn, ep, peer, done):
        await peer.call(Command.DMA_MAP, M.DmaMap(32, 3, 0, 0x20000, 0x1000).pack())  # message mode
        fn.ram.mm[:8] = b"zpci-dma"
        await peer.call(Command.REGION_WRITE, wr(REG_DMA_ADDR, struct.pack("<Q", 0x20000)))
        await peer.call(Command.REGION_WRITE, wr(REG_DMA_LEN, struct.pack("<I", 8)))
        cmd_id = await peer.send(Command.REGION_WRITE, wr(REG_DMA_CMD, struct.pack("<I", DMA_CMD_TO_HOST)))
        later_id = await peer.send(Command.REGION_READ, rd(REG_MAGIC, 4))
        req = await peer.next_event()
        assert isinstance(req, Request) and req.msg.header.cmd == Command.DMA_WRITE
        acc = M.DmaAccess.unpack(req.msg.payload, with_data=True)
        assert (acc.addr, acc.data) == (0x20000, b"zpci-dma")
        await peer.t.send([peer.conn.reply(req.msg, M.DmaAccess(acc.addr, acc.count).pack())])
        first, second = await peer.next_event(), await peer.next_event()
        assert [first.msg.header.msg_id, second.msg.header.msg_id] == [cmd_id, later_id]
        status = await peer.call(Command.REGION_READ, rd(REG_DMA_STATUS, 4))
        assert status.payload[16:] == bytes(4)
        # The other way, refused by the client: the device sees a fault.
        await peer.send(Command.REGION_WRITE, wr(REG_DMA_CMD, struct.pack("<I", DMA_CMD_FROM_HOST)))
        req = await peer.next_event()
        assert isinstance(req, Request) and req.msg.header.cmd == Command.DMA_READ
        await peer.t.send([peer.conn.error(req.msg, errno.EFAULT)])
        assert isinstance(await peer.next_event(), Reply)
        status = await peer.call(Command.REGION_READ, rd(REG_DMA_STATUS, 4))
        assert status.payload[16:] == struct.pack("<I", 1)
        assert ep.stats.dma_messages == 2


async def test_client_leaving_while_the_device_waits_fails_the_dma_as_gone():
    async with session() as (fn, ep, peer, done):
        await peer.call(Command.DMA_MAP, M.DmaMap(32, 3, 0, 0x20000, 0x1000).pack())
        failures = []

        async def device():
            try:
                await ep.dma_read(0x20000, 64)
            except Exception as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(device)
            req = await peer.next_event()
            assert req.msg.header.cmd == Command.DMA_READ
            await peer.t.aclose()  # gone without answering
        (exc,) = failures
        assert exc.client_gone and exc.errno == errno.EFAULT
        assert str(exc) == "DMA read 0x20000+0x40: client went away"


async def test_snapshot_keeps_commands_read_but_not_served():
    """Quiesced while a handler waits for its DMA reply: the command read behind it
    is neither served nor lost, it is in the snapshot's unread bytes."""
    async with session() as (fn, ep, peer, done):
        await peer.call(Command.DMA_MAP, M.DmaMap(32, 3, 0, 0x20000, 0x1000).pack())
        await peer.call(Command.REGION_WRITE, wr(REG_DMA_ADDR, struct.pack("<Q", 0x20000)))
        await peer.call(Command.REGION_WRITE, wr(REG_DMA_LEN, struct.pack("<I", 8)))
        cmd_id, dma_cmd = peer.conn.send_request(Command.REGION_WRITE,
                                                 wr(REG_DMA_CMD, struct.pack("<I", DMA_CMD_TO_HOST)))
        later_id, later = peer.conn.send_request(Command.REGION_READ, rd(REG_MAGIC, 4))
        await peer.t.send([dma_cmd + later])  # one read brings both
        req = await peer.next_event()
        assert req.msg.header.cmd == Command.DMA_WRITE
        async with trio.open_nursery() as nursery:
            quiesced = []

            async def quiesce():
                quiesced.append(await ep.quiesce())

            nursery.start_soon(quiesce)
            await trio.sleep(0.01)
            await peer.t.send([peer.conn.reply(req.msg, M.DmaAccess(0x20000, 8).pack())])
        assert quiesced == [True]
        first = await peer.next_event()
        assert first.msg.header.msg_id == cmd_id
        snap = await ep.snapshot()
        assert snap.unread == later
        ep.resume()
        second = await peer.next_event()
        assert second.msg.header.msg_id == later_id
