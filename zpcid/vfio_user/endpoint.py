"""One attached vfio-user client: negotiation, dispatch, server-to-client DMA."""

from __future__ import annotations

import collections
import errno
import itertools
import time

import attrs
import trio

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.errors import ProtocolError
from protocol.vfio_user.framing import Framer, Message
from protocol.vfio_user.header import HEADER_SIZE, Command, Flags, error_reply, pack_header, validate_flags
from zpcid import log
from zpcid.vfio_user.device import VfioDevice
from zpcid.vfio_user.dma import DmaError, DmaFault
from zpcid.vfio_user.irq import IrqError
from zpcid.vfio_user.regions import RegionError
from zpcid.vfio_user.transport import SocketTransport, Transport, TransportError, close_fds

# What zpcid accepts; kept short because QEMU sizes its VERSION reply buffer
# by its own request.
SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DATA_XFER = 1 << 20
SERVER_MAX_DMA_MAPS = 65535
DMA_REPLY_TIMEOUT = 5.0
MAX_QUEUED_COMMANDS = 65536
MAX_QUEUED_BYTES = 64 << 20

_HANDLED_ERRORS = (ProtocolError, DmaError, IrqError, RegionError)


class Disconnect(Exception):
    """Drop this client (fatal protocol error or EOF)."""


class Stats:
    __slots__ = ("messages", "errors", "bytes_read", "bytes_written", "dma_messages")

    def __init__(self) -> None:
        self.messages = self.errors = self.bytes_read = self.bytes_written = self.dma_messages = 0


class Endpoint:
    """Serves one client connection for one device until it leaves."""

    def __init__(self, transport: Transport, device: VfioDevice, *, name: str = "",
                 max_dma_maps: int = SERVER_MAX_DMA_MAPS):
        self.transport = transport
        self.device = device
        self.log = log.get("zpcid.vfio_user.endpoint", function=name)
        self.framer = Framer()
        self.client_caps: M.Capabilities | None = None
        self.max_dma_maps = max_dma_maps
        self.stats = Stats()
        self._queue: collections.deque[Message] = collections.deque()
        self._queue_event = trio.Event()
        self._queued_bytes = 0
        self._session_scope = trio.CancelScope()
        self._drop_reason: str | None = None
        self._pending: dict[int, list] = {}  # msg_id -> [event, message]
        self._ids = itertools.count(1)
        self._closed = False
        self.connected_at = time.time()

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        reason = "eof"
        try:
            async with trio.open_nursery() as nursery:
                self._session_scope = nursery.cancel_scope
                nursery.start_soon(self._reader)
                try:
                    await self._dispatcher()
                except Disconnect as exc:
                    reason = str(exc)
                nursery.cancel_scope.cancel()
            self.log.info("client_disconnected", reason=self._drop_reason or reason)
        finally:
            self._closed = True
            for waiter in self._pending.values():
                waiter[0].set()
            for msg in self._queue:
                if msg is not None:  # the reader's end-of-stream sentinel
                    close_fds(msg.fds)
            close_fds(self.framer.pending_fds())
            await self.transport.aclose()

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    data, fds = await self.transport.recv()
                except TransportError as exc:
                    self.log.warning("protocol_error", error=str(exc), action="disconnect")
                    break
                if not data:
                    close_fds(fds)
                    break
                try:
                    msgs = self.framer.feed(data, fds)
                except ProtocolError as exc:
                    close_fds(fds)
                    self.log.warning("protocol_error", error=str(exc), action="disconnect")
                    break
                for i, msg in enumerate(msgs):
                    if msg.header.flags & Flags.TYPE_MASK == Flags.REPLY or (
                        msg.header.is_error and msg.header.msg_id in self._pending
                    ):
                        self._on_reply(msg)
                    else:
                        self._queued_bytes += msg.header.msg_size
                        if (len(self._queue) >= MAX_QUEUED_COMMANDS
                                or self._queued_bytes > MAX_QUEUED_BYTES):
                            # A client that sends without reading its replies must not
                            # grow the daemon's memory without bound; and the dispatcher
                            # may be stuck sending to it, so end the session outright.
                            for dropped in msgs[i:]:
                                close_fds(dropped.fds)
                            self.log.warning("protocol_error", error="command queue overflow",
                                             action="disconnect")
                            self._drop_reason = "command queue overflow"
                            self._session_scope.cancel()
                            return
                        self._queue.append(msg)
                        self._queue_event.set()
        finally:
            # Sentinel: no more commands will come.
            self._queue.append(None)  # type: ignore[arg-type]
            self._queue_event.set()
            # Nor replies: a device waiting on DMA_READ/WRITE fails now rather
            # than after the reply timeout.
            self._closed = True
            for waiter in self._pending.values():
                waiter[0].set()

    def _on_reply(self, msg: Message) -> None:
        waiter = self._pending.get(msg.header.msg_id)
        close_fds(msg.fds)
        if waiter is None or msg.header.cmd not in (Command.DMA_READ, Command.DMA_WRITE):
            self.log.warning("unexpected_reply", msg_id=msg.header.msg_id, cmd=msg.header.cmd)
            return
        waiter[1] = msg
        waiter[0].set()

    async def _next_command(self) -> Message | None:
        while not self._queue:
            self._queue_event = trio.Event()
            await self._queue_event.wait()
        msg = self._queue.popleft()
        if msg is not None:
            self._queued_bytes -= msg.header.msg_size
        return msg

    async def _dispatcher(self) -> None:
        first = await self._next_command()
        if first is None:
            raise Disconnect("closed before VERSION")
        await self._negotiate(first)
        while True:
            msg = await self._next_command()
            if msg is None:
                return
            await self._handle(msg)

    # ------------------------------------------------------------------ replies
    async def _send(self, header: bytes, payload: bytes = b"", fds=()) -> None:
        try:
            await self.transport.send([header + payload] if payload else [header], fds)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise Disconnect(f"send failed: {exc}") from None

    async def _reply(self, msg: Message, payload: bytes = b"", fds=()) -> None:
        if msg.header.no_reply:
            return
        h = msg.header
        await self._send(pack_header(h.msg_id, h.cmd, len(payload), Flags.REPLY), payload, fds)

    async def _error(self, msg: Message, err: int, reason: str) -> None:
        self.stats.errors += 1
        self.log.warning("protocol_error", cmd=msg.header.cmd, msg_id=msg.header.msg_id,
                         errno=errno.errorcode.get(err, err), error=reason)
        if not msg.header.no_reply:
            await self._send(error_reply(msg.header.msg_id, msg.header.cmd, err))

    # ------------------------------------------------------------------ negotiation
    async def _negotiate(self, msg: Message) -> None:
        try:
            close_fds(msg.fds)
            if msg.header.cmd != Command.VERSION:
                raise ProtocolError("first message must be VERSION")
            if msg.fds:
                raise ProtocolError("VERSION must not carry descriptors")
            req = M.Version.unpack(msg.payload)
            if req.major != 0:
                raise ProtocolError(f"unsupported major version {req.major}", errno.ENOTSUP)
        except ProtocolError as exc:
            await self._error(msg, exc.errno, str(exc))
            raise Disconnect(f"negotiation failed: {exc}") from None
        self.client_caps = req.capabilities
        caps = M.Capabilities(
            max_msg_fds=SERVER_MAX_MSG_FDS,
            max_data_xfer_size=SERVER_MAX_DATA_XFER,
            max_dma_maps=min(self.max_dma_maps, req.capabilities.max_dma_maps or self.max_dma_maps),
            pgsizes=C.DEFAULT_PGSIZES,
            write_multiple=req.capabilities.write_multiple,
        )
        # Minor 0 is all zpcid needs, and QEMU rejects anything above what it proposed.
        await self._reply(msg, M.Version(0, 0, caps).pack())
        self.log.info("client_attached", client_minor=req.minor,
                      client_max_xfer=req.capabilities.max_data_xfer_size,
                      client_max_fds=req.capabilities.max_msg_fds)

    # ------------------------------------------------------------------ dispatch
    async def _handle(self, msg: Message) -> None:
        self.stats.messages += 1
        h = msg.header
        fds = list(msg.fds)
        try:
            validate_flags(h.flags)
            if h.is_error:
                raise ProtocolError("ERROR flag set on a command")
            handler = self._handlers.get(h.cmd)
            if handler is None:
                raise ProtocolError(f"unknown or unsupported command {h.cmd}", errno.ENOSYS)
            fds = await handler(self, msg, fds)
        except _HANDLED_ERRORS as exc:
            await self._error(msg, exc.errno, str(exc))
        except DmaFault as exc:
            await self._error(msg, errno.EFAULT, str(exc))
        except (Disconnect, trio.Cancelled):
            raise
        except Exception as exc:  # a device bug must not take the daemon down
            self.log.exception("handler_failed", cmd=h.cmd)
            await self._error(msg, errno.EIO, f"internal error: {exc!r}")
        finally:
            if fds:
                close_fds(fds)

    async def _h_version(self, msg, fds):
        raise ProtocolError("VERSION already negotiated")

    async def _h_dma_map(self, msg, fds):
        req = M.DmaMap.unpack(msg.payload)
        if len(fds) > 1:
            raise ProtocolError(f"DMA_MAP with {len(fds)} descriptors")
        fd = fds[0] if fds else None
        self.device.dma_map(req.addr, req.size, req.readable, req.writable, fd, req.offset)
        self.log.info("dma_map", iova=hex(req.addr), size=hex(req.size), fd=fd is not None,
                      flags=req.flags)
        await self._reply(msg)
        return fds  # the mapping keeps its own reference; close ours

    async def _h_dma_unmap(self, msg, fds):
        req = M.DmaUnmap.unpack(msg.payload)
        if req.unmap_all:
            n = self.device.dma_unmap_all()
        else:
            n = self.device.dma_unmap(req.addr, req.size)
        self.log.info("dma_unmap", iova=hex(req.addr), size=hex(req.size), all=req.unmap_all,
                      removed=n)
        await self._reply(msg, M.DmaUnmap(M.DmaUnmap.SIZE, req.flags, req.addr, req.size).pack())
        return fds

    async def _h_get_info(self, msg, fds):
        req = M.DeviceInfo.unpack(msg.payload)
        flags, nregions, nirqs = self.device.device_info()
        await self._reply(msg, M.DeviceInfo(M.DeviceInfo.SIZE, flags, nregions, nirqs).pack())
        return fds

    async def _h_region_info(self, msg, fds):
        req = M.RegionInfo.unpack_request(msg.payload)
        desc = self.device.region_info(req.index)
        flags, caps, fd = desc.flags, desc.caps, desc.fd
        if fd is not None and self.client_caps is not None and self.client_caps.max_msg_fds == 0:
            # The client can take no descriptors: offer the region as not mmappable.
            flags &= ~C.VFIO_REGION_INFO_FLAG_MMAP
            caps = tuple(c for c in caps if not isinstance(c, M.SparseMmapCap))
            fd = None
        desc = attrs.evolve(desc, flags=flags, caps=caps, fd=fd)
        info = M.RegionInfo(0, desc.flags, req.index, 0, desc.size, desc.offset, desc.caps)
        payload, fits = info.pack_reply(req.argsz)
        # Like libvfio-user, the fd travels only with the complete reply.
        send_fds = [desc.fd] if (desc.fd is not None and (fits or not desc.caps)) else []
        await self._reply(msg, payload, send_fds)
        return fds

    async def _h_region_io_fds(self, msg, fds):
        req = M.RegionIoFds.unpack(msg.payload)
        self.device.region_info(req.index)  # validates the index
        await self._reply(msg, M.RegionIoFds(M.RegionIoFds.SIZE, 0, req.index, 0).pack())
        return fds

    async def _h_irq_info(self, msg, fds):
        req = M.IrqInfo.unpack(msg.payload)
        flags, count = self.device.irq_info(req.index)
        await self._reply(msg, M.IrqInfo(M.IrqInfo.SIZE, flags, req.index, count).pack())
        return fds

    async def _h_set_irqs(self, msg, fds):
        req = M.IrqSet.unpack(msg.payload)
        received = len(fds)
        rest = self.device.set_irqs(req, fds)
        # The IRQ table owns the others now; if the reply below fails, _handle must
        # not close descriptors that are installed as eventfds.
        fds[:] = rest
        self.log.debug("set_irqs", index=req.index, start=req.start, count=req.count,
                       flags=req.flags, fds=received)
        await self._reply(msg)
        return rest

    def _check_xfer(self, count: int) -> None:
        if count > SERVER_MAX_DATA_XFER:
            raise ProtocolError(f"count {count} exceeds max_data_xfer_size", errno.E2BIG)

    async def _h_region_read(self, msg, fds):
        req = M.RegionAccess.unpack(msg.payload, with_data=False)
        self._check_xfer(req.count)
        data = await self.device.region_read(req.region, req.offset, req.count)
        self.stats.bytes_read += len(data)
        await self._reply(msg, req.pack_head() + data)
        return fds

    async def _h_region_write(self, msg, fds):
        req = M.RegionAccess.unpack(msg.payload, with_data=True)
        self._check_xfer(req.count)
        await self.device.region_write(req.region, req.offset, req.data)
        self.stats.bytes_written += req.count
        await self._reply(msg, req.pack_head())
        return fds

    async def _h_region_write_multi(self, msg, fds):
        req = M.RegionWriteMulti.unpack(msg.payload)
        for e in req.entries:
            await self.device.region_write(e.region, e.offset, e.data)
        await self._reply(msg, len(req.entries).to_bytes(8, "little"))
        return fds

    async def _h_reset(self, msg, fds):
        await self.device.reset()
        await self._reply(msg)
        return fds

    async def _h_feature(self, msg, fds):
        req = M.DeviceFeature.unpack(msg.payload)
        # No device feature (migration, dirty logging) is offered yet; this is
        # what the kernel answers for an unsupported feature.
        raise ProtocolError(f"device feature {req.feature} not supported", errno.ENOTTY)

    async def _h_mig_data(self, msg, fds):
        raise ProtocolError("migration is not offered", errno.EINVAL)

    async def _h_wrong_direction(self, msg, fds):
        raise ProtocolError(f"command {msg.header.cmd} is sent by servers only")

    _handlers = {
        Command.VERSION: _h_version,
        Command.DMA_MAP: _h_dma_map,
        Command.DMA_UNMAP: _h_dma_unmap,
        Command.DEVICE_GET_INFO: _h_get_info,
        Command.DEVICE_GET_REGION_INFO: _h_region_info,
        Command.DEVICE_GET_REGION_IO_FDS: _h_region_io_fds,
        Command.DEVICE_GET_IRQ_INFO: _h_irq_info,
        Command.DEVICE_SET_IRQS: _h_set_irqs,
        Command.REGION_READ: _h_region_read,
        Command.REGION_WRITE: _h_region_write,
        Command.REGION_WRITE_MULTI: _h_region_write_multi,
        Command.DEVICE_RESET: _h_reset,
        Command.DEVICE_FEATURE: _h_feature,
        Command.MIG_DATA_READ: _h_mig_data,
        Command.MIG_DATA_WRITE: _h_mig_data,
        Command.DMA_READ: _h_wrong_direction,
        Command.DMA_WRITE: _h_wrong_direction,
    }

    # ------------------------------------------------------------------ server -> client DMA
    @property
    def client_max_xfer(self) -> int:
        caps = self.client_caps
        return caps.max_data_xfer_size if caps else C.DEFAULT_MAX_DATA_XFER_SIZE

    async def _request(self, cmd: int, payload: bytes) -> Message:
        if self._closed:
            raise DmaFault(0, 0, cmd == Command.DMA_WRITE, "client is gone")
        msg_id = next(self._ids) & 0xFFFF
        waiter = [trio.Event(), None]
        self._pending[msg_id] = waiter
        try:
            try:
                await self._send(pack_header(msg_id, cmd, len(payload)), payload)
            except Disconnect as exc:
                # Device code (often a deferred task) sees a DMA fault; the session
                # ends through the reader's EOF.
                raise DmaFault(0, 0, cmd == Command.DMA_WRITE, str(exc)) from None
            self.stats.dma_messages += 1
            with trio.move_on_after(DMA_REPLY_TIMEOUT):
                await waiter[0].wait()
        finally:
            self._pending.pop(msg_id, None)
        reply = waiter[1]
        if reply is None:
            raise DmaFault(0, 0, cmd == Command.DMA_WRITE, "client did not answer DMA request")
        return reply

    async def dma_read(self, addr: int, count: int) -> bytes:
        out = bytearray()
        # The reply carries the data, so it must also fit what zpcid accepts.
        step = min(self.client_max_xfer, SERVER_MAX_DATA_XFER)
        for off in range(0, count, step):
            n = min(step, count - off)
            reply = await self._request(Command.DMA_READ, M.DmaAccess(addr + off, n).pack())
            if reply.header.is_error:
                raise DmaFault(addr + off, n, False, f"client refused DMA_READ (errno {reply.header.error_no})")
            try:
                acc = M.DmaAccess.unpack(reply.payload, with_data=True)
            except ProtocolError as exc:
                raise DmaFault(addr + off, n, False, f"bad DMA_READ reply: {exc}") from None
            if acc.addr != addr + off or acc.count != n:
                raise DmaFault(addr + off, n, False, "DMA_READ reply does not match request")
            out += acc.data
        return bytes(out)

    async def dma_write(self, addr: int, data: bytes) -> None:
        step = self.client_max_xfer
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            reply = await self._request(Command.DMA_WRITE, M.DmaAccess(addr + off, len(chunk), chunk).pack())
            if reply.header.is_error:
                raise DmaFault(addr + off, len(chunk), True,
                               f"client refused DMA_WRITE (errno {reply.header.error_no})")
            # A header-only reply (as QEMU sends) is accepted as success.
            if reply.payload:
                try:
                    acc = M.DmaAccess.unpack(reply.payload, with_data=False)
                except ProtocolError as exc:
                    raise DmaFault(addr + off, len(chunk), True, f"bad DMA_WRITE reply: {exc}") from None
                if acc.addr != addr + off or acc.count != len(chunk):
                    raise DmaFault(addr + off, len(chunk), True, "DMA_WRITE reply does not match request")
