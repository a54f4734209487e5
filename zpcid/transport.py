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
    """A connected AF_UNIX stream socket; one ``send`` is one ``sendmsg``."""

    def __init__(self, sock: trio.socket.SocketType, max_fds: int = 253):
        self.sock = sock
        self._ancbuf = socket.CMSG_SPACE(max_fds * 4)
        self._send_lock = trio.Lock()
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
        return self.sock.fileno()

    async def recv(self) -> tuple[bytes, list[int]]:
        """Next chunk of bytes and the fds that came with it; b"" on EOF."""
        try:
            n, anc, flags, _ = await self.sock.recvmsg_into(
                [self._rbuf], self._ancbuf, socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, BrokenPipeError):
            return b"", []
        data = self._rview[:n].tobytes()
        fds = _fds_from_ancdata(anc)
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise TransportError("ancillary data truncated: peer sent too many descriptors")
        return data, fds

    async def send(self, parts: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        async with self._send_lock:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            sent = await self.sock.sendmsg([data], anc)
            view = memoryview(data)
            while sent < len(data):
                # Descriptors travel with the first byte only.
                sent += await self.sock.send(view[sent:])

    async def aclose(self) -> None:
        self.sock.close()
        await trio.lowlevel.checkpoint()
