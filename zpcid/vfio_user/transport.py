"""Stream transport with SCM_RIGHTS descriptor passing over a trio Unix socket.

The vfio-user endpoint only needs ``recv``/``send``/``aclose``; a different
transport (or a libvfio-user backend replacing the endpoint) plugs in here.
"""

from __future__ import annotations

import array
import os
import socket
from typing import Protocol, Sequence

import trio

RECV_CHUNK = 256 * 1024


class Transport(Protocol):
    async def recv(self) -> tuple[bytes, list[int]]: ...
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
    it would block, which keeps a request/reply round trip to a few scheduler
    passes.
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
        self._send_lock = trio.Lock()
        self._eager_reads = 0
        # One receive buffer for the connection's life: recvmsg() would allocate
        # (and the allocator mmap/munmap) a 256 KiB object per call.
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)

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
                n, anc, flags, _ = raw.recvmsg_into([self._rbuf], self._ancbuf, socket.MSG_CMSG_CLOEXEC)
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
        fds = _fds_from_ancdata(anc)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise TransportError("ancillary data truncated: peer sent too many descriptors")
        return data, fds

    async def send(self, parts: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        sent = 0
        if not self._send_lock.locked():
            # Fast path, no await: nothing can interleave with this sendmsg.
            try:
                sent = self.raw.sendmsg([data], anc)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
        async with self._send_lock:
            view = memoryview(data)
            while sent < len(data):
                await trio.lowlevel.wait_writable(self.raw)
                try:
                    # Descriptors travel with the first byte only.
                    sent += self.raw.sendmsg([view[sent:]], anc if sent == 0 else [])
                except BlockingIOError:
                    pass

    async def aclose(self) -> None:
        if self.raw.fileno() >= 0:
            trio.lowlevel.notify_closing(self.raw)
            self.raw.close()
        await trio.lowlevel.checkpoint()
