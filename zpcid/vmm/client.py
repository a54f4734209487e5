"""Reference vfio-user client (the VMM side), used by tests, demo and benchmarks.

It shows what a VMM integrator needs: negotiate, share guest memory (memfd)
with DMA_MAP, query regions and IRQs, install eventfds, access regions
(through the mmap where offered) and serve DMA_READ/DMA_WRITE.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from typing import AsyncIterator, Sequence

import attrs
import trio

from protocol.errors import ErrnoError, ProtocolError
from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.connection import Connection, Reply, Request, Role, State
from protocol.vfio_user.framing import Message
from protocol.vfio_user.header import Command
from zpcid.vfio_user.transport import SocketTransport, close_fds

REPLY_TIMEOUT = 5.0

CLIENT_CAPS = M.Capabilities(
    max_msg_fds=16, max_data_xfer_size=1 << 20, max_dma_maps=65535, pgsizes=4096,
    write_multiple=True, migration={"pgsize": 4096, "max_bitmap_size": 268435456},
)


class VfioUserError(ErrnoError):
    """The server answered with an error reply."""

    def __init__(self, cmd: int, errno_: int):
        name = errno.errorcode.get(errno_, str(errno_))
        super().__init__(f"{Command(cmd).name if cmd in Command._value2member_map_ else cmd}: {name}", errno_)
        self.cmd = cmd


@attrs.define
class RegionMap:
    info: M.RegionInfo
    mm: mmap.mmap | None = None
    areas: tuple[tuple[int, int], ...] = ()  # (offset, size) inside the region that are mapped

    def covers(self, offset: int, count: int) -> bool:
        return self.mm is not None and any(
            a <= offset and offset + count <= a + s for a, s in self.areas
        )


@attrs.define
class ClientMemory:
    """A range of client memory served for message-mode DMA."""

    iova: int
    size: int
    buf: object  # anything supporting the buffer protocol, writable
    writable: bool = True


class _Waiter:
    """One of our requests awaiting its reply (the connection's reply token)."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: Message | None = None


@attrs.define
class PendingReply:
    """A command sent without waiting; collect it with ``Client.wait_reply``."""

    msg_id: int
    cmd: int
    waiter: _Waiter


class Client:
    """The VMM side of one connection; the session rules are ``Connection``'s."""

    def __init__(self, transport: SocketTransport, caps: M.Capabilities = CLIENT_CAPS):
        self.transport = transport
        self.conn = Connection(Role.CLIENT, caps)
        self.regions: dict[int, RegionMap] = {}
        self.memory: list[ClientMemory] = []
        self.dma_requests = 0
        self._eof = trio.Event()

    @property
    def server_caps(self) -> M.Capabilities | None:
        return self.conn.peer_caps

    @property
    def server_version(self) -> tuple[int, int] | None:
        return self.conn.version

    @property
    def unexpected(self) -> int:
        """Replies that answered nothing we were waiting for."""
        return self.conn.stray_replies

    # ------------------------------------------------------------------ plumbing
    async def _reader(self) -> None:
        try:
            while True:
                data, fds = await self.transport.recv()
                if not data:
                    close_fds(fds)
                    return
                for ev in self.conn.receive_data(data, fds):
                    if type(ev) is Reply:
                        ev.token.reply = ev.msg
                        ev.token.event.set()
                    elif type(ev) is Request:
                        await self._serve(ev.msg)
                    else:
                        close_fds(ev.msg.fds)
        except (ProtocolError, OSError):
            return
        finally:
            self._eof.set()
            for waiter in self.conn.close():
                waiter.event.set()

    async def _send_request(self, cmd: int, payload: bytes, fds: Sequence[int], *,
                            no_reply: bool = False, minor: int = 0) -> PendingReply:
        if self.conn.state is State.CLOSED:
            raise ConnectionError("server closed the connection")
        waiter = _Waiter()
        if cmd == Command.VERSION:
            msg_id, data = self.conn.version_request(minor, token=waiter)
        else:
            msg_id, data = self.conn.send_request(cmd, payload, no_reply=no_reply, token=waiter)
        try:
            await self.transport.send([data], fds)
        except BaseException:
            self.conn.forget(msg_id)
            raise
        return PendingReply(msg_id, cmd, waiter)

    async def request(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = (),
                      *, no_reply: bool = False, timeout: float = REPLY_TIMEOUT) -> Message | None:
        """Send a command; return its reply (raise VfioUserError on an error reply)."""
        pending = await self._send_request(cmd, payload, fds, no_reply=no_reply)
        if no_reply:
            return None
        return await self.wait_reply(pending, timeout)

    async def negotiate(self, caps: M.Capabilities | None = None, minor: int = 0) -> M.Version:
        if caps is not None and caps != self.conn.our_caps:
            self.conn = Connection(Role.CLIENT, caps)
        pending = await self._send_request(Command.VERSION, b"", (), minor=minor)
        reply = await self.wait_reply(pending)
        return self.conn.version_accepted(Reply(reply, pending.waiter))

    # ------------------------------------------------------------------ memory
    async def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0, *,
                      read: bool = True, write: bool = True, buf=None) -> None:
        """Share memory: with ``fd`` the server mmaps it, else it is served from ``buf``."""
        flags = (C.VFIO_DMA_MAP_FLAG_READ if read else 0) | (C.VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        await self.request(Command.DMA_MAP, M.DmaMap(32, flags, offset if fd is not None else 0,
                                                     iova, size).pack(),
                           [fd] if fd is not None else [])
        if fd is None and buf is not None:
            self.memory.append(ClientMemory(iova, size, buf, write))

    async def dma_map_nowait(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                             *, read: bool = True, write: bool = True) -> PendingReply:
        """Pipelined DMA_MAP as QEMU sends them at boot; collect it with ``wait_reply``."""
        flags = (C.VFIO_DMA_MAP_FLAG_READ if read else 0) | (C.VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        payload = M.DmaMap(32, flags, offset if fd is not None else 0, iova, size).pack()
        return await self._send_request(Command.DMA_MAP, payload, [fd] if fd is not None else [])

    async def wait_reply(self, pending: PendingReply, timeout: float = REPLY_TIMEOUT) -> Message:
        """The reply to a pipelined command (raise VfioUserError on an error reply)."""
        try:
            with trio.fail_after(timeout):
                await pending.waiter.event.wait()
        finally:
            if pending.waiter.reply is None:
                self.conn.forget(pending.msg_id)
        reply = pending.waiter.reply
        if reply is None:
            raise ConnectionError("server closed the connection")
        if reply.header.is_error:
            close_fds(reply.fds)
            raise VfioUserError(pending.cmd, reply.header.error_no)
        return reply

    async def dma_unmap(self, iova: int, size: int) -> None:
        await self.request(Command.DMA_UNMAP, M.DmaUnmap(24, 0, iova, size).pack())
        self.memory = [m for m in self.memory if not (iova <= m.iova and m.iova + m.size <= iova + size)]

    async def dma_unmap_all(self) -> None:
        await self.request(Command.DMA_UNMAP, M.DmaUnmap(24, C.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0).pack())
        self.memory.clear()

    def _find_memory(self, addr: int, count: int) -> ClientMemory | None:
        for m in self.memory:
            if m.iova <= addr and addr + count <= m.iova + m.size:
                return m
        return None

    async def _serve(self, msg: Message) -> None:
        """Answer a server-to-client DMA_READ/DMA_WRITE from client memory."""
        h = msg.header
        close_fds(msg.fds)
        self.dma_requests += 1
        try:
            self.conn.check_request(msg)
            if h.cmd == Command.DMA_READ:
                req = M.DmaAccess.unpack(msg.payload, with_data=False)
                m = self._find_memory(req.addr, req.count)
                if m is None:
                    raise ProtocolError("DMA_READ outside client memory", errno.EFAULT)
                off = req.addr - m.iova
                data = bytes(memoryview(m.buf)[off : off + req.count])
                payload = M.DmaAccess(req.addr, req.count, data).pack()
            else:
                req = M.DmaAccess.unpack(msg.payload, with_data=True)
                m = self._find_memory(req.addr, req.count)
                if m is None or not m.writable:
                    raise ProtocolError("DMA_WRITE outside writable client memory", errno.EFAULT)
                off = req.addr - m.iova
                memoryview(m.buf)[off : off + req.count] = req.data
                payload = M.DmaAccess(req.addr, req.count).pack()
        except ProtocolError as exc:
            data = self.conn.error(msg, exc.errno)
        else:
            data = self.conn.reply(msg, payload)
        if data is not None:
            await self.transport.send([data])

    # ------------------------------------------------------------------ device
    async def get_info(self) -> M.DeviceInfo:
        reply = await self.request(Command.DEVICE_GET_INFO, M.DeviceInfo(16).pack())
        return M.DeviceInfo.unpack(reply.payload)

    async def region_info(self, index: int, *, map: bool = True) -> RegionMap:
        """Query a region the way QEMU does (argsz 32, then the full size) and mmap it."""
        reply = await self.request(Command.DEVICE_GET_REGION_INFO,
                                   M.RegionInfo(argsz=32, index=index).pack_request())
        info = M.RegionInfo.unpack_reply(reply.payload)
        fds = list(reply.fds)
        if info.argsz > 32:
            close_fds(fds)
            reply = await self.request(Command.DEVICE_GET_REGION_INFO,
                                       M.RegionInfo(argsz=info.argsz, index=index).pack_request())
            info = M.RegionInfo.unpack_reply(reply.payload)
            fds = list(reply.fds)
        rm = RegionMap(info)
        try:
            if map and fds and info.flags & C.VFIO_REGION_INFO_FLAG_MMAP and info.size:
                areas = next((c.areas for c in info.caps if isinstance(c, M.SparseMmapCap)),
                             ((0, info.size),))
                prot = mmap.PROT_READ | (mmap.PROT_WRITE if info.flags & C.VFIO_REGION_INFO_FLAG_WRITE else 0)
                rm.mm = mmap.mmap(fds[0], info.size, mmap.MAP_SHARED, prot, offset=info.offset)
                rm.areas = tuple(areas)
        finally:
            close_fds(fds)
        old = self.regions.get(index)
        if old is not None and old.mm is not None:
            old.mm.close()
        self.regions[index] = rm
        return rm

    async def irq_info(self, index: int) -> M.IrqInfo:
        reply = await self.request(Command.DEVICE_GET_IRQ_INFO, M.IrqInfo(16, 0, index).pack())
        return M.IrqInfo.unpack(reply.payload)

    async def set_irqs(self, index: int, start: int, count: int, flags: int,
                       fds: Sequence[int] = (), data: bytes = b"") -> None:
        # argsz 20 with descriptors out of band, exactly as QEMU sends it.
        await self.request(Command.DEVICE_SET_IRQS,
                           M.IrqSet(20 + len(data), flags, index, start, count, data).pack(), fds)

    async def enable_irq_eventfds(self, index: int, count: int, start: int = 0) -> list[int]:
        """Create eventfds for vectors start..start+count-1 and install them; caller owns them."""
        fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(count)]
        try:
            await self.set_irqs(index, start, count,
                                C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER, fds)
        except BaseException:
            close_fds(fds)
            raise
        return fds

    async def disable_irqs(self, index: int) -> None:
        await self.set_irqs(index, 0, 0, C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER)

    async def region_read(self, index: int, offset: int, count: int, *, via_mmap: bool = True) -> bytes:
        rm = self.regions.get(index)
        if via_mmap and rm is not None and rm.covers(offset, count):
            return rm.mm[offset : offset + count]
        reply = await self.request(Command.REGION_READ, M.RegionAccess(offset, index, count).pack())
        acc = M.RegionAccess.unpack(reply.payload, with_data=True)
        return acc.data

    async def region_write(self, index: int, offset: int, data: bytes, *,
                           via_mmap: bool = True, posted: bool = False) -> None:
        rm = self.regions.get(index)
        if via_mmap and rm is not None and rm.covers(offset, len(data)):
            rm.mm[offset : offset + len(data)] = data
            return
        await self.request(Command.REGION_WRITE, M.RegionAccess(offset, index, len(data), data).pack(),
                           no_reply=posted)

    async def reset(self) -> None:
        await self.request(Command.DEVICE_RESET)

    async def close(self) -> None:
        for rm in self.regions.values():
            if rm.mm is not None:
                try:
                    rm.mm.close()
                except BufferError:
                    pass
        self.regions.clear()
        await self.transport.aclose()


def read_eventfd(fd: int) -> int:
    """Consume an eventfd counter; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


async def wait_eventfd(fd: int, timeout: float = 5.0) -> int:
    with trio.fail_after(timeout):
        while True:
            n = read_eventfd(fd)
            if n:
                return n
            await trio.lowlevel.wait_readable(fd)


@contextlib.asynccontextmanager
async def connect(path: str, *, negotiate: bool = True,
                  caps: M.Capabilities = CLIENT_CAPS) -> AsyncIterator[Client]:
    """Connect, start the reply reader, negotiate; close on exit."""
    transport = await SocketTransport.connect(path)
    client = Client(transport, caps)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            if negotiate:
                await client.negotiate()
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Let callers see the one real error rather than a group of one.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await client.close()
