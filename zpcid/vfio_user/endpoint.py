"""One attached vfio-user client: negotiation, dispatch, server-to-client DMA.

The message path runs in one task: it reads what the socket holds, serves each
command where it was read and hands the reply to the socket without waiting
(what does not fit is queued in order and written by a helper task).  Nothing
hops to a second task and the scheduler is entered once per wait for input.

Reading is a role, not a task: whoever needs input takes it.  Normally that
is the connection task; while it is busy in a handler that waits for device
work, a device task waiting for its DMA_READ/DMA_WRITE reply reads the socket
itself, routes the replies and queues the commands it finds for the
connection task, in order.  So no handler can deadlock against a DMA reply.
"""

from __future__ import annotations

import collections
import errno
import struct
import time

import attrs
import trio

from protocol.errors import ErrnoError, ProtocolError
from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.connection import Connection, Reply, Request, Role, State
from protocol.vfio_user.framing import Message
from protocol.vfio_user.header import HEADER, Command, Flags
from zpcid import log
from zpcid.snapshot import Fd, Snapshot, SnapshotError, expect
from zpcid.vfio_user.device import VfioDevice
from zpcid.vfio_user.dma import DmaFault
from zpcid.vfio_user.transport import Transport, TransportError, close_fds

# What zpcid accepts; kept short because QEMU sizes its VERSION reply buffer
# by its own request.
SERVER_MAX_MSG_FDS = 16
SERVER_MAX_DATA_XFER = 1 << 20
SERVER_MAX_DMA_MAPS = 65535
DMA_REPLY_TIMEOUT = 5.0
# Budgets against a client that sends without reading: commands read but not
# yet served, and reply bytes the socket has not taken.  Past either the
# session ends, so the daemon's memory stays bounded.
MAX_QUEUED_COMMANDS = 65536
MAX_QUEUED_BYTES = 64 << 20
# Commands served back to back before other tasks get a turn.
SERVE_BATCH = 32
# A client must complete VERSION this soon after connecting, and take what
# zpcid sends within SEND_TIMEOUT; otherwise it is dropped, so one that trickles
# bytes or never reads cannot hold the function from the next VMM.
NEGOTIATE_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0

_REGION_HEAD = struct.Struct("<QII")  # REGION_READ/WRITE: offset, region, count
_NO_REPLY = Flags.NO_REPLY


class Disconnect(Exception):
    """Drop this client (fatal protocol error or EOF)."""


class Stats:
    __slots__ = ("messages", "errors", "bytes_read", "bytes_written", "dma_messages")

    def __init__(self) -> None:
        self.messages = self.errors = self.bytes_read = self.bytes_written = self.dma_messages = 0


class _Waiter:
    """A DMA request of ours awaiting its reply (the connection's reply token)."""

    __slots__ = ("reply",)

    def __init__(self) -> None:
        self.reply: Message | None = None


class Endpoint:
    """Serves one client connection for one device until it leaves."""

    def __init__(self, transport: Transport, device: VfioDevice, *, name: str = "",
                 max_dma_maps: int = SERVER_MAX_DMA_MAPS):
        self.transport = transport
        self.device = device
        self.log = log.get("zpcid.vfio_user.endpoint", function=name)
        self.conn = Connection(Role.SERVER, M.Capabilities(
            max_msg_fds=SERVER_MAX_MSG_FDS, max_data_xfer_size=SERVER_MAX_DATA_XFER,
            max_dma_maps=max_dma_maps, pgsizes=C.DEFAULT_PGSIZES, write_multiple=True))
        self.max_dma_maps = max_dma_maps
        self.stats = Stats()
        self._backlog: collections.deque[Message] = collections.deque()
        self._backlog_bytes = 0
        self._reading = False  # someone holds the reading role
        self._read_done = trio.lowlevel.ParkingLot()  # tasks waiting for that read
        self._input_closed = False  # EOF, or the stream cannot be trusted any more
        self._output = trio.Event()  # the writer task has queued bytes to flush
        self._session_scope = trio.CancelScope()
        self._drop_reason: str | None = None
        self.connected_at = time.time()
        # Live restart: the connection task parks at a message boundary while
        # ``_pause`` is set; ``_parked`` tells quiesce() it got there (or ended).
        self._pause = False
        self._parked = trio.Event()
        self._unpause = trio.Event()
        self._recv_scope: trio.CancelScope | None = None
        self._waiting_input = False

    @property
    def framer(self):
        return self.conn.framer

    @property
    def client_caps(self) -> M.Capabilities | None:
        return self.conn.peer_caps

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._parked.set()  # a quiesce() waiting for us learns the session ended

    async def _run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._session_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                nursery.start_soon(self._negotiation_deadline)
                try:
                    await self._serve()
                except Disconnect as exc:
                    self._drop_reason = self._drop_reason or str(exc)
                nursery.cancel_scope.cancel()
            self.log.info("client_disconnected", reason=self._drop_reason or "eof")
        finally:
            self._input_closed = True
            self.conn.close()
            self._read_done.unpark_all()  # DMA requests fail now, not at their timeout
            for msg in self._backlog:
                close_fds(msg.fds)
            self._backlog.clear()
            close_fds(self.framer.pending_fds())
            try:
                self.transport.flush_nowait()  # e.g. the error reply to a bad VERSION
            except (OSError, AttributeError):
                pass
            await self.transport.aclose()

    async def _serve(self) -> None:
        while True:
            # quiesce() cancels this scope, and only while the loop waits for
            # input (``_waiting_input``), so nothing read is lost; the loop then
            # parks at the message boundary.  One scope per session rather than
            # one per read: entering a cancel scope costs as much as parsing and
            # answering a register access.
            with trio.CancelScope() as self._recv_scope:
                await self._serve_loop()
                return

    async def _serve_loop(self) -> None:
        backlog = self._backlog
        served = 0
        while True:
            while backlog and not self._pause:
                msg = backlog.popleft()
                self._backlog_bytes -= msg.header.msg_size
                if self.conn.state is State.AWAIT_VERSION:
                    self._negotiate(msg)
                else:
                    await self._handle(msg)
                served += 1
                if served >= SERVE_BATCH:
                    # Bounded work per slice: a flood of commands must not starve
                    # device tasks or other functions' sessions.
                    served = 0
                    await trio.lowlevel.checkpoint()
            if self._input_closed:
                if self.conn.state is State.AWAIT_VERSION:
                    raise Disconnect(self._drop_reason or "closed before VERSION")
                return
            if self._pause:
                self._parked.set()
                await self._unpause.wait()
                continue
            self._waiting_input = True
            try:
                await self._receive()
            finally:
                self._waiting_input = False

    async def _receive(self) -> None:
        """Read once as the only reader (or wait for the current reader's read)."""
        if self._reading:
            await self._read_done.park()
            return
        self._reading = True
        try:
            try:
                data, fds = await self.transport.recv()
            except TransportError as exc:
                self._close_input(f"protocol error: {exc}")
                return
            if not data:
                close_fds(fds)
                self._input_closed = True
                return
            try:
                events = self.conn.receive_data(data, fds)
            except ProtocolError as exc:
                close_fds(fds)
                self._close_input(f"protocol error: {exc}")
                return
            for i, ev in enumerate(events):
                msg = ev.msg
                if type(ev) is Request:
                    self._backlog.append(msg)
                    self._backlog_bytes += msg.header.msg_size
                    if (len(self._backlog) > MAX_QUEUED_COMMANDS
                            or self._backlog_bytes > MAX_QUEUED_BYTES):
                        for later in events[i + 1:]:
                            close_fds(later.msg.fds)
                        self._drop("command queue overflow")
                        return
                elif type(ev) is Reply:
                    close_fds(msg.fds)
                    ev.token.reply = msg
                else:
                    close_fds(msg.fds)
                    self.log.warning("unexpected_reply", msg_id=msg.header.msg_id, cmd=msg.header.cmd)
        finally:
            self._reading = False
            if self._read_done:
                self._read_done.unpark_all()

    def _close_input(self, reason: str) -> None:
        self.log.warning("protocol_error", error=reason, action="disconnect")
        self._drop_reason = reason
        self._input_closed = True

    def _drop(self, reason: str) -> None:
        """End the session now, whatever the connection task is doing."""
        if self._drop_reason is None:
            self.log.warning("protocol_error", error=reason, action="disconnect")
            self._drop_reason = reason
        self._input_closed = True
        self._session_scope.cancel()

    # ------------------------------------------------------------------ sending
    def _send(self, data: bytes, fds=()) -> None:
        """Hand a message to the socket without waiting (the writer task flushes the rest)."""
        try:
            if self.transport.send_nowait(data, fds):
                return
        except OSError as exc:
            self._drop(f"send failed: {exc}")
            raise Disconnect(f"send failed: {exc}") from None
        if self.transport.queued > MAX_QUEUED_BYTES:
            self._drop("client does not read its replies")
            raise Disconnect("client does not read its replies")
        self._output.set()

    async def _writer(self) -> None:
        while True:
            await self._output.wait()
            self._output = trio.Event()
            with trio.move_on_after(SEND_TIMEOUT) as stalled:
                try:
                    await self.transport.flush()
                except OSError as exc:
                    self._drop(f"send failed: {exc}")
                    return
            if stalled.cancelled_caught:
                self._drop(f"client did not read for {SEND_TIMEOUT:g} s")
                return

    async def _negotiation_deadline(self) -> None:
        await trio.sleep(NEGOTIATE_TIMEOUT)
        if self.conn.state is State.AWAIT_VERSION:
            self._drop(f"no VERSION within {NEGOTIATE_TIMEOUT:g} s")

    def _reply(self, msg: Message, payload: bytes = b"", fds=()) -> None:
        data = self.conn.reply(msg, payload)
        if data is not None:
            self._send(data, fds)

    def _error(self, msg: Message, err: int, reason: str) -> None:
        self.stats.errors += 1
        self.log.warning("protocol_error", cmd=msg.header.cmd, msg_id=msg.header.msg_id,
                         errno=errno.errorcode.get(err, err), error=reason)
        data = self.conn.error(msg, err)
        if data is not None:
            self._send(data)

    # ------------------------------------------------------------------ negotiation
    def _negotiate(self, msg: Message) -> None:
        close_fds(msg.fds)
        try:
            reply = self.conn.accept_version(msg)
        except ProtocolError as exc:
            self._error(msg, exc.errno, str(exc))
            raise Disconnect(f"negotiation failed: {exc}") from None
        if reply is not None:
            self._send(reply)
        caps = self.conn.peer_caps
        self.log.info("client_attached", client_minor=self.conn.version[1] if self.conn.version else 0,
                      client_max_xfer=caps.max_data_xfer_size, client_max_fds=caps.max_msg_fds)

    # ------------------------------------------------------------------ dispatch
    async def _handle(self, msg: Message) -> None:
        self.stats.messages += 1
        # One list for the handler and the cleanup below: a handler that hands
        # descriptors over (SET_IRQS) removes them from it before anything can
        # fail, so a failing reply never closes an installed eventfd.
        fds = list(msg.fds)
        try:
            handler = self._handlers.get(msg.header.cmd)
            if handler is None or msg.header.flags & ~_NO_REPLY:
                self.conn.check_request(msg)  # raises with the right errno
                if handler is None:
                    raise ProtocolError(f"unknown or unsupported command {msg.header.cmd}", errno.ENOSYS)
            fds = await handler(self, msg, fds)
        except ErrnoError as exc:
            self._error(msg, exc.errno, str(exc))
        except (Disconnect, trio.Cancelled):
            raise
        except Exception as exc:  # a device bug must not take the daemon down
            self.log.exception("handler_failed", cmd=msg.header.cmd)
            self._error(msg, errno.EIO, f"internal error: {exc!r}")
        finally:
            if fds:
                close_fds(fds)

    async def _h_dma_map(self, msg, fds):
        req = M.DmaMap.unpack(msg.payload)
        if len(fds) > 1:
            raise ProtocolError(f"DMA_MAP with {len(fds)} descriptors")
        fd = fds[0] if fds else None
        self.device.dma_map(req.addr, req.size, req.readable, req.writable, fd, req.offset)
        # Per-message events stay at debug: QEMU on s390x sends one per guest page.
        if log.debug_enabled():
            self.log.debug("dma_map", iova=req.addr, size=req.size, fd=fd is not None, flags=req.flags)
        self._reply(msg)
        return fds  # the mapping keeps its own reference; close ours

    async def _h_dma_unmap(self, msg, fds):
        req = M.DmaUnmap.unpack(msg.payload)
        if req.unmap_all:
            n = self.device.dma_unmap_all()
        else:
            n = self.device.dma_unmap(req.addr, req.size)
        if log.debug_enabled():
            self.log.debug("dma_unmap", iova=req.addr, size=req.size, all=req.unmap_all, removed=n)
        self._reply(msg, M.DmaUnmap(M.DmaUnmap.SIZE, req.flags, req.addr, req.size).pack())
        return fds

    async def _h_get_info(self, msg, fds):
        M.DeviceInfo.unpack(msg.payload)  # validates the request
        flags, nregions, nirqs = self.device.device_info()
        self._reply(msg, M.DeviceInfo(M.DeviceInfo.SIZE, flags, nregions, nirqs).pack())
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
        self._reply(msg, payload, send_fds)
        return fds

    async def _h_region_io_fds(self, msg, fds):
        req = M.RegionIoFds.unpack(msg.payload)
        self.device.region_info(req.index)  # validates the index
        self._reply(msg, M.RegionIoFds(M.RegionIoFds.SIZE, 0, req.index, 0).pack())
        return fds

    async def _h_irq_info(self, msg, fds):
        req = M.IrqInfo.unpack(msg.payload)
        flags, count = self.device.irq_info(req.index)
        self._reply(msg, M.IrqInfo(M.IrqInfo.SIZE, flags, req.index, count).pack())
        return fds

    async def _h_set_irqs(self, msg, fds):
        req = M.IrqSet.unpack(msg.payload)
        received = len(fds)
        rest = self.device.set_irqs(req, fds)
        # The IRQ table owns the others now; if the reply below fails, _handle must
        # not close descriptors that are installed as eventfds.
        fds[:] = rest
        if log.debug_enabled():
            self.log.debug("set_irqs", index=req.index, start=req.start, count=req.count,
                           flags=req.flags, fds=received)
        self._reply(msg)
        return rest

    # REGION_READ/WRITE are most of the traffic: unpacked here with one
    # precompiled struct, and the reply echoes the request's 16-byte head.
    async def _h_region_read(self, msg, fds):
        payload = msg.payload
        if len(payload) != 16:
            M.RegionAccess.unpack(payload, with_data=False)  # raises the precise error
        offset, region, count = _REGION_HEAD.unpack(payload)
        self.conn.check_xfer(count)
        data = await self.device.region_read(region, offset, count)
        self.stats.bytes_read += len(data)
        self._reply(msg, payload + data)
        return fds

    async def _h_region_write(self, msg, fds):
        payload = msg.payload
        offset, region, count = _REGION_HEAD.unpack_from(payload) if len(payload) >= 16 else (0, 0, -1)
        if len(payload) - 16 != count:
            M.RegionAccess.unpack(payload, with_data=True)  # raises the precise error
        self.conn.check_xfer(count)
        await self.device.region_write(region, offset, payload[16:])
        self.stats.bytes_written += count
        self._reply(msg, payload[:16])
        return fds

    async def _h_region_write_multi(self, msg, fds):
        req = M.RegionWriteMulti.unpack(msg.payload)
        for e in req.entries:
            await self.device.region_write(e.region, e.offset, e.data)
        self._reply(msg, len(req.entries).to_bytes(8, "little"))
        return fds

    async def _h_reset(self, msg, fds):
        await self.device.reset()
        self._reply(msg)
        return fds

    async def _h_feature(self, msg, fds):
        req = M.DeviceFeature.unpack(msg.payload)
        # No device feature (migration, dirty logging) is offered yet; this is
        # what the kernel answers for an unsupported feature.
        raise ProtocolError(f"device feature {req.feature} not supported", errno.ENOTTY)

    async def _h_mig_data(self, msg, fds):
        raise ProtocolError("migration is not offered", errno.EINVAL)

    _handlers = {
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
    }

    # ------------------------------------------------------------------ live restart
    async def quiesce(self) -> bool:
        """Stop serving at a message boundary and stop reading; False if the session ended.

        Device work still running may read (its DMA replies); commands it finds
        wait in the backlog.  Call ``resume`` to go on, or ``snapshot`` once the
        device is idle too.
        """
        self._pause = True
        self._unpause = trio.Event()
        if self._waiting_input and self._recv_scope is not None:
            self._recv_scope.cancel()
        await self._parked.wait()
        return not self._input_closed

    def resume(self) -> None:
        self._pause = False
        self._parked = trio.Event()
        self._unpause.set()

    @property
    def quiesced(self) -> bool:
        return self._pause and self._parked.is_set() and not self._input_closed

    async def snapshot(self) -> "EndpointSnapshot":
        """The connection as it stands (quiesced, device idle): negotiated state, the
        bytes read but not served with their fds, and the socket itself (borrowed)."""
        if not self.quiesced or self._reading:
            raise SnapshotError("endpoint is not quiesced")
        await self.transport.flush()  # every reply is on the wire before anyone else writes
        try:
            conn = self.conn.export_state()
        except ValueError as exc:
            raise SnapshotError(f"endpoint busy: {exc}") from None
        stream = bytearray()
        fds: dict[int, tuple] = {}
        for msg in self._backlog:
            if msg.fds:
                fds[len(stream)] = tuple(Fd(fd) for fd in msg.fds)
            h = msg.header
            stream += HEADER.pack(h.msg_id, h.cmd, h.msg_size, h.flags, h.error_no) + msg.payload
        rest, rest_fds = self.framer.export_buffer()
        for off, group in rest_fds.items():
            fds[len(stream) + off] = tuple(Fd(fd) for fd in group)
        stream += rest
        st = self.stats
        return EndpointSnapshot(
            socket=Fd(self.transport.fileno()), connection=conn, unread=bytes(stream), unread_fds=fds,
            stats={k: getattr(st, k) for k in Stats.__slots__}, connected_at=self.connected_at)

    def restore(self, snap: "EndpointSnapshot") -> None:
        """Continue the connection of ``snap`` (this endpoint was made on its socket and
        has not run yet); takes the fds of the unread messages."""
        try:
            expect(snap, EndpointSnapshot)
            try:
                conn = Connection.from_state(snap.connection)
            except (KeyError, TypeError, ValueError) as exc:
                raise SnapshotError(f"vfio-user connection state: {exc}") from None
            if conn.role is not Role.SERVER:
                raise SnapshotError("connection state is not a server's")
            msgs = conn.framer.import_buffer(snap.unread, {k: tuple(map(int, v))
                                                           for k, v in snap.unread_fds.items()})
        except BaseException:
            for group in snap.unread_fds.values():
                close_fds(list(group))
            raise
        self.conn = conn
        for msg in msgs:
            self._backlog.append(msg)
            self._backlog_bytes += msg.header.msg_size
        for k, v in snap.stats.items():
            if k in Stats.__slots__:
                setattr(self.stats, k, v)
        self.connected_at = snap.connected_at

    # ------------------------------------------------------------------ server -> client DMA
    @property
    def client_max_xfer(self) -> int:
        return self.conn.peer_max_xfer

    def _gone(self, addr: int, count: int, write: bool) -> DmaFault:
        return DmaFault(addr, count, write, "client went away", client_gone=True)

    async def _request(self, cmd: int, addr: int, count: int, payload: bytes) -> Message:
        write = cmd == Command.DMA_WRITE
        if self._input_closed:
            raise self._gone(addr, count, write)
        waiter = _Waiter()
        msg_id, data = self.conn.send_request(cmd, payload, token=waiter)
        try:
            try:
                self._send(data)
            except Disconnect:
                # Device code (often a deferred task) sees a DMA fault; the
                # session is already being torn down.
                raise self._gone(addr, count, write) from None
            self.stats.dma_messages += 1
            with trio.move_on_after(DMA_REPLY_TIMEOUT):
                while waiter.reply is None and not self._input_closed:
                    await self._receive()
        finally:
            if waiter.reply is None:
                self.conn.forget(msg_id)
        reply = waiter.reply
        if reply is None:
            if self._input_closed:
                raise self._gone(addr, count, write)
            raise DmaFault(addr, count, write, f"client did not answer within {DMA_REPLY_TIMEOUT:g} s")
        return reply

    async def dma_read(self, addr: int, count: int) -> bytes:
        out = bytearray()
        # The reply carries the data, so it must also fit what zpcid accepts.
        step = self.conn.dma_chunk
        for off in range(0, count, step):
            n = min(step, count - off)
            reply = await self._request(Command.DMA_READ, addr + off, n, M.DmaAccess(addr + off, n).pack())
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
        step = self.conn.peer_max_xfer
        for off in range(0, len(data), step):
            chunk = data[off : off + step]
            n = len(chunk)
            reply = await self._request(Command.DMA_WRITE, addr + off, n, M.DmaAccess(addr + off, n, chunk).pack())
            if reply.header.is_error:
                raise DmaFault(addr + off, n, True, f"client refused DMA_WRITE (errno {reply.header.error_no})")
            # A header-only reply (as QEMU sends) is accepted as success.
            if reply.payload:
                try:
                    acc = M.DmaAccess.unpack(reply.payload, with_data=False)
                except ProtocolError as exc:
                    raise DmaFault(addr + off, n, True, f"bad DMA_WRITE reply: {exc}") from None
                if acc.addr != addr + off or acc.count != n:
                    raise DmaFault(addr + off, n, True, "DMA_WRITE reply does not match request")


@attrs.frozen
class EndpointSnapshot(Snapshot):
    """One client connection between two messages."""

    KIND = "vfio_user.endpoint"
    socket: Fd  # the connected socket
    connection: dict  # Connection.export_state()
    unread: bytes  # commands read but not served, then a partial message
    unread_fds: dict  # stream offset of a message -> its fds
    stats: dict
    connected_at: float
