"""A byte-level vfio-user peer for tests: exact bytes out, SCM_RIGHTS fds, raw replies in.

Unlike ``zpcid.vmm.client`` it does no validation and no demultiplexing, so tests
can send what a broken or hostile VMM would send and see exactly what comes back.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from typing import AsyncIterator, Sequence

import attrs
import trio

from protocol.vfio_user.header import HEADER, HEADER_SIZE, Command, Flags

TIMEOUT = 5.0

# QEMU 11.1's VERSION request as observed on the wire: major 0, minor 0, this
# JSON (with its spaces) and a NUL; 214 bytes including the header.
QEMU_VERSION_JSON = (
    b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
    b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, '
    b'"pgsize": 4096}, "write_multiple": true}}'
)
QEMU_VERSION_PAYLOAD = struct.pack("<HH", 0, 0) + QEMU_VERSION_JSON + b"\0"


def message(msg_id: int, cmd: int, payload: bytes = b"", flags: int = 0,
            msg_size: int | None = None, error_no: int = 0) -> bytes:
    """Header + payload; ``msg_size`` may be given to lie about the length."""
    size = HEADER_SIZE + len(payload) if msg_size is None else msg_size
    return HEADER.pack(msg_id, cmd, size, flags, error_no) + payload


@attrs.frozen
class Raw:
    msg_id: int
    cmd: int
    msg_size: int
    flags: int
    error_no: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        return self.flags & Flags.TYPE_MASK == Flags.REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flags.ERROR)

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.payload)


class RawPeer:
    """One connected AF_UNIX stream socket, driven by hand."""

    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """One sendmsg (fds travel with the first byte), then plain sends for the rest."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sent = await self.sock.sendmsg([data], anc)
        while sent < len(data):
            sent += await self.sock.send(data[sent:])

    async def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            try:
                data, anc, _flags, _ = await self.sock.recvmsg(
                    65536, socket.CMSG_SPACE(64 * 4), socket.MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError:
                # The server hung up with our unread bytes still queued on its side.
                return False
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(blob[: len(blob) - len(blob) % 4])
                    self._fds.extend(a)
            if not data:
                return False
            self._buf += data
        return True

    async def recv(self, timeout: float = TIMEOUT) -> Raw:
        """The next whole message; fds received meanwhile are handed to it (caller closes)."""
        with trio.fail_after(timeout):
            if not await self._fill(HEADER_SIZE):
                raise EOFError(f"EOF after {len(self._buf)} bytes")
            msg_id, cmd, size, flags, error_no = HEADER.unpack_from(self._buf)
            if not await self._fill(size):
                raise EOFError("EOF inside a message")
        payload = bytes(self._buf[HEADER_SIZE:size])
        del self._buf[:size]
        fds, self._fds = tuple(self._fds), []
        return Raw(msg_id, cmd, size, flags, error_no, payload, fds)

    async def expect_eof(self, timeout: float = TIMEOUT) -> None:
        """Assert the server hangs up without sending anything more."""
        with trio.fail_after(timeout):
            ok = await self._fill(len(self._buf) + 1)
        assert not ok and not self._buf, f"expected EOF, got {bytes(self._buf)!r}"

    async def call(self, msg_id: int, cmd: int, payload: bytes = b"", fds: Sequence[int] = (),
                   flags: int = 0) -> Raw:
        await self.send(message(msg_id, cmd, payload, flags), fds)
        reply = await self.recv()
        assert reply.msg_id == msg_id and reply.cmd == cmd, reply
        return reply

    async def negotiate(self) -> dict:
        """VERSION exactly as QEMU 11.1 sends it; returns the reply's capabilities."""
        reply = await self.call(0x4242, Command.VERSION, QEMU_VERSION_PAYLOAD)
        assert reply.is_reply and not reply.is_error, reply
        return json.loads(reply.payload[4:-1])["capabilities"]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.sock.close()


@contextlib.asynccontextmanager
async def raw_connect(path: str, *, negotiate: bool = True) -> AsyncIterator[RawPeer]:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    peer = RawPeer(sock)
    try:
        if negotiate:
            await peer.negotiate()
        yield peer
    finally:
        peer.close()


async def settle(server, timeout: float = TIMEOUT) -> None:
    """Wait until the server has finished detaching its client."""
    with trio.fail_after(timeout):
        await server.wait_detached()


@contextlib.asynccontextmanager
async def memory_server(sock_dir: str, **options):
    """A `memory` function served on a real socket; yields (function, server)."""
    from helpers import serving
    from zpcid.devices.memory import MemoryFunction

    fn = MemoryFunction("t", **options)
    try:
        async with serving(fn, sock_dir) as server:
            yield fn, server
    finally:
        fn.close()


def find_capability(config: bytes, cap_id: int) -> int:
    """Walk the capability list from config offset 0x34; 0 if absent."""
    pos, seen = config[0x34] & ~3, 0
    while pos:
        assert 0x40 <= pos <= 0xFC and seen < 48, f"bad capability pointer {pos:#x}"
        if config[pos] == cap_id:
            return pos
        pos, seen = config[pos + 1] & ~3, seen + 1
    return 0
