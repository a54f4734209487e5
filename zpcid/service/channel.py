"""The private channel between the supervisor, the zygote and the workers.

A frame is a 4-byte little-endian length and that many bytes of a JSON object;
descriptors travel as SCM_RIGHTS on the ``sendmsg`` that carries the length
prefix. The reader reads the prefix and the body with exact-size ``recvmsg``
calls, so descriptors can only arrive with the prefix of their own frame.
Message shapes (requests, replies, events) are in ``docs/isolation.md``.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

import trio

from zpcid.vfio_user.transport import _fds_from_ancdata, close_fds

MAX_FRAME = 16 << 20  # a mappings reply of a large shadow IOTLB fits; nothing larger is needed
MAX_FDS = 253  # SCM_MAX_FD
MAX_DEPTH = 64  # JSON nesting accepted from a peer
# A frame once begun is finished even if the task is cancelled, so a channel
# whose reader or writer stops (an upgrade passes channels on through exec)
# is always left at a frame boundary; a peer that stalls mid-frame this long
# has broken the framing.
FRAME_TIMEOUT = 10.0
_LEN = struct.Struct("<I")
_ANC = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class ChannelError(Exception):
    """The peer closed the channel or broke its framing."""


class Closed(ChannelError):
    """End of file: the peer is gone."""


def encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), default=str).encode()
    if len(body) > MAX_FRAME:
        raise ChannelError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def _depth_ok(text: bytes) -> bool:
    """Nesting bound checked on the raw bytes, before the recursive parser sees them."""
    depth = 0
    in_str = escape = False
    for b in text:
        if in_str:
            if escape:
                escape = False
            elif b == 0x5C:
                escape = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def decode(body: bytes) -> dict[str, Any]:
    if not _depth_ok(body):
        raise ChannelError(f"frame nested deeper than {MAX_DEPTH}")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ChannelError("frame is not a JSON object")
    return obj


def _ancdata(fds) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def _length(prefix: bytes) -> int:
    (n,) = _LEN.unpack(prefix)
    if n > MAX_FRAME:
        raise ChannelError(f"peer announced a frame of {n} bytes (limit {MAX_FRAME})")
    return n


class Channel:
    """One end of a channel socketpair under trio; sends are serialised by a lock."""

    def __init__(self, sock: socket.socket):
        self.sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    async def send(self, obj: dict[str, Any], fds=()) -> None:
        data = memoryview(encode(obj))
        if len(fds) > MAX_FDS:
            raise ChannelError(f"{len(fds)} descriptors exceed {MAX_FDS}")
        async with self._send_lock:
            try:
                n = await self.sock.sendmsg([data], _ancdata(fds))
                if n < len(data):
                    with trio.CancelScope(shield=True), trio.move_on_after(FRAME_TIMEOUT) as late:
                        while n < len(data):
                            data = data[n:]
                            n = await self.sock.send(data)
                    if late.cancelled_caught:
                        raise Closed("channel send stalled mid-frame")
            except (OSError, trio.ClosedResourceError) as exc:
                raise Closed(f"channel send failed: {exc}") from None

    async def _read(self, n: int, want_fds: bool) -> tuple[bytes, list[int]]:
        buf = bytearray()
        fds: list[int] = []
        try:
            while len(buf) < n:
                data, anc, flags, _ = await self.sock.recvmsg(n - len(buf), _ANC if want_fds else 0)
                got = _fds_from_ancdata(anc)
                fds += got
                if flags & socket.MSG_CTRUNC:
                    close_fds(fds)
                    raise ChannelError("descriptors truncated")
                if not data:
                    close_fds(fds)
                    raise Closed("channel closed by the peer")
                buf += data
                want_fds = False
        except (OSError, trio.ClosedResourceError) as exc:
            close_fds(fds)
            raise Closed(f"channel receive failed: {exc}") from None
        return bytes(buf), fds

    async def recv(self) -> tuple[dict[str, Any], list[int]]:
        """The next frame and the descriptors that came with it (caller owns them)."""
        prefix, fds = await self._read(_LEN.size, True)
        try:
            n = _length(prefix)
            with trio.CancelScope(shield=True), trio.move_on_after(FRAME_TIMEOUT) as late:
                body, _ = await self._read(n, False)
            if late.cancelled_caught:
                raise ChannelError("peer stalled mid-frame")
            return decode(body), fds
        except BaseException:
            close_fds(fds)
            raise

    def detach(self) -> int:
        """Our socket's fd, no longer ours to close (it goes on to another owner)."""
        return self.sock.detach()

    def close(self) -> None:
        self.sock.close()


class SyncChannel:
    """The same framing over a blocking socket (the zygote never runs trio)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, obj: dict[str, Any], fds=()) -> None:
        data = encode(obj)
        n = self.sock.sendmsg([data], _ancdata(fds))
        if n < len(data):
            self.sock.sendall(data[n:])

    def _read(self, n: int, want_fds: bool) -> tuple[bytes, list[int]]:
        buf = bytearray()
        fds: list[int] = []
        while len(buf) < n:
            data, anc, flags, _ = self.sock.recvmsg(n - len(buf), _ANC if want_fds else 0)
            fds += _fds_from_ancdata(anc)
            if flags & socket.MSG_CTRUNC or not data:
                close_fds(fds)
                raise (ChannelError("descriptors truncated") if data else Closed("channel closed"))
            buf += data
            want_fds = False
        return bytes(buf), fds

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        prefix, fds = self._read(_LEN.size, True)
        try:
            body, _ = self._read(_length(prefix), False)
            return decode(body), fds
        except BaseException:
            close_fds(fds)
            raise


def error(rid: Any, code: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"code": code, "message": message}}


def set_process_name(name: str) -> None:
    """The name ps/top show (the kernel keeps 15 bytes); cosmetic, so failures are ignored."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A close-on-exec stream pair (only fork passes it on, never exec)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
