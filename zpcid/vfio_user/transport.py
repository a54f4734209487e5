"""Stream transport with SCM_RIGHTS descriptor passing over a trio Unix socket.

The vfio-user endpoint only needs ``recv``/``send``/``aclose``; a different
transport (or a libvfio-user backend replacing the endpoint) plugs in here.
"""

from __future__ import annotations

import array
import collections
import os
import socket
from typing import Protocol, Sequence

import trio

RECV_CHUNK = 256 * 1024
# Plain ints: ``flags & socket.MSG_CTRUNC`` goes through IntFlag arithmetic,
# which costs ~1 us -- as much as framing a message.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class Transport(Protocol):
    """What the vfio-user endpoint and client need from a byte stream with descriptors."""

    async def recv(self) -> tuple[bytes, list[int]]: ...
    def send_nowait(self, data: bytes, fds: Sequence[int] = ()) -> bool: ...
    @property
    def queued(self) -> int: ...
    async def flush(self) -> None: ...
    def flush_nowait(self) -> None: ...
    async def send(self, parts: Sequence[bytes], fds: Sequence[int] = ()) -> None: ...
    async def aclose(self) -> None: ...


class TransportError(Exception):
    """The peer broke the transport (truncated ancillary data, reset)."""


def _fds_from_ancdata(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def _scm_rights(fds: Sequence[int]) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class SocketTransport:
    """A connected AF_UNIX stream socket; one ``send`` is one ``sendmsg``.

    Driven with raw non-blocking calls and ``trio.lowlevel.wait_readable`` /
    ``wait_writable``: the syscall is tried first and the task parks only when
    it would block, so a request/reply round trip costs one scheduler pass.
    Sending never has to wait: what the socket cannot take yet is queued in
    order and written by ``flush``.
    """

    # Yield to other tasks after this many reads that found data waiting, so a
    # flooding peer cannot starve the rest of the daemon.
    FAIRNESS = 16

    def __init__(self, sock, max_fds: int = 253):
        if isinstance(sock, socket.socket):
            raw = sock
        else:  # a trio socket: take over its descriptor
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=sock.detach())
        raw.setblocking(False)
        self.raw = raw
        self._ancbuf = socket.CMSG_SPACE(max_fds * 4)
        # Messages send_nowait could not hand to the socket yet, oldest first.
        self._out: collections.deque[tuple[bytes | memoryview, Sequence[int]]] = collections.deque()
        self._queued = 0
        self._flush_lock = trio.Lock()
        self._eager_reads = 0
        # One receive buffer for the connection's life: recvmsg() would allocate
        # (and the allocator mmap/munmap) a 256 KiB object per call.
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)
        self._rbufs = [self._rbuf]

    @classmethod
    async def connect(cls, path: str, max_fds: int = 253) -> "SocketTransport":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, max_fds)

    def fileno(self) -> int:
        return self.raw.fileno()

    async def recv(self) -> tuple[bytes, list[int]]:
        """Next chunk of bytes and the fds that came with it; b"" on EOF."""
        raw = self.raw
        if self._eager_reads >= self.FAIRNESS:
            self._eager_reads = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                n, anc, flags, _ = raw.recvmsg_into(self._rbufs, self._ancbuf, _MSG_CMSG_CLOEXEC)
                break
            except BlockingIOError:
                self._eager_reads = 0
                await trio.lowlevel.wait_readable(raw)
            except (ConnectionResetError, BrokenPipeError):
                return b"", []
            except OSError as exc:
                if raw.fileno() < 0:
                    return b"", []  # closed under us
                raise TransportError(str(exc)) from None
        self._eager_reads += 1
        data = self._rview[:n].tobytes()
        fds = _fds_from_ancdata(anc) if anc else []
        if flags & _MSG_CTRUNC:
            close_fds(fds)
            raise TransportError("ancillary data truncated: peer sent too many descriptors")
        return data, fds

    # ------------------------------------------------------------------ sending
    @property
    def queued(self) -> int:
        """Bytes accepted by ``send_nowait`` that the socket has not taken yet."""
        return self._queued

    def send_nowait(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send one message now, or queue it behind earlier ones; never waits.

        Returns True if the socket took all of it, False if (part of) it is
        queued for ``flush``.  The descriptors travel with the message's first
        byte; messages leave in the order they were given.  Raises OSError if
        the peer is gone.
        """
        if not self._out:
            try:
                sent = self.raw.sendmsg([data], _scm_rights(fds)) if fds else self.raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return True
            if sent:
                data, fds = memoryview(data)[sent:], ()
        self._out.append((data, fds))
        self._queued += len(data)
        return False

    async def flush(self) -> None:
        """Wait until everything queued by ``send_nowait`` is in the socket.

        Cancellation leaves the unsent rest queued, so the stream stays whole.
        """
        if not self._out:
            return await trio.lowlevel.checkpoint()
        async with self._flush_lock:  # one task may wait for writability at a time
            while self._out:
                await trio.lowlevel.wait_writable(self.raw)
                self.flush_nowait()

    def flush_nowait(self) -> None:
        """Hand the socket as much of the queue as it takes now."""
        out = self._out
        while out:
            data, fds = out[0]
            try:
                sent = self.raw.sendmsg([data], _scm_rights(fds) if fds else ())
            except BlockingIOError:
                return
            self._queued -= sent
            if sent < len(data):
                out[0] = (memoryview(data)[sent:], ())
                return
            out.popleft()

    async def send(self, parts: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        """Send one message (the parts joined), waiting while the socket is full."""
        if not self.send_nowait(parts[0] if len(parts) == 1 else b"".join(parts), fds):
            await self.flush()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def aclose(self) -> None:
        if self.raw.fileno() >= 0:
            trio.lowlevel.notify_closing(self.raw)
            self.raw.close()
        await trio.lowlevel.checkpoint()
