"""Stream framing: bytes plus received file descriptors in, whole messages out."""

import errno
from typing import NamedTuple

from protocol.errors import ProtocolError
from protocol.vfio_user.header import HEADER, HEADER_SIZE, Header

_make_header = Header._make
_unpack_header = HEADER.unpack_from

# Room for a maximal data transfer plus the largest fixed part of any message.
DEFAULT_MAX_MSG_SIZE = HEADER_SIZE + 64 + (1 << 20)


class Message(NamedTuple):
    """One complete message (a tuple: made once per message, so it must be cheap)."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


class Framer:
    """Reassembles messages from a byte stream.

    File descriptors arrive with the ``recvmsg`` that reads the first bytes of
    the ``sendmsg`` that carried them, and Linux ends such a read at the end of
    that sender's buffer.  So the descriptors delivered with a chunk belong to
    the last message that *starts* inside that chunk.
    """

    def __init__(self, max_msg_size: int = DEFAULT_MAX_MSG_SIZE):
        self.max_msg_size = max_msg_size
        # Always starts at the first incomplete message, so message starts can
        # be walked from offset 0.
        self._buf = bytearray()
        self._fds: dict[int, tuple[int, ...]] = {}  # message start offset -> fds

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def export_buffer(self) -> tuple[bytes, dict[int, tuple[int, ...]]]:
        """Bytes not yet returned as messages, and their fds by message start offset
        (to carry an unfinished stream over to another process)."""
        return bytes(self._buf), dict(self._fds)

    def import_buffer(self, data: bytes, fds: dict[int, tuple[int, ...]]) -> list[Message]:
        """Continue from an ``export_buffer`` of another framer; returns the complete messages."""
        if self._buf or self._fds:
            raise ValueError("framer already holds data")
        self._buf = bytearray(data)
        self._fds = {int(k): tuple(v) for k, v in fds.items()}
        return self._drain()

    def pending_fds(self) -> list[int]:
        """Descriptors attached to messages not yet complete (to close on teardown)."""
        return [fd for fds in self._fds.values() for fd in fds]

    def _header_at(self, pos: int, buf=None) -> Header:
        hdr = _make_header(_unpack_header(self._buf if buf is None else buf, pos))
        msg_size = hdr.msg_size
        if msg_size < HEADER_SIZE:
            raise ProtocolError(f"msg_size {msg_size} smaller than the header", fatal=True)
        if msg_size > self.max_msg_size:
            raise ProtocolError(
                f"msg_size {msg_size} exceeds limit {self.max_msg_size}", errno.E2BIG, fatal=True
            )
        return hdr

    def feed(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> list[Message]:
        """Add received bytes (and the fds that came with them); return complete messages.

        On a fatal ``ProtocolError`` the caller still owns ``fds`` and must close them.
        """
        if not fds and not self._buf:
            return self._feed_whole(data)
        buf = self._buf
        chunk_start = len(buf)
        buf += data
        chunk_end = len(buf)
        if fds:
            pos, last = 0, -1
            while pos < chunk_end:
                if pos >= chunk_start:
                    last = pos
                if pos + HEADER_SIZE > chunk_end:
                    break
                pos += self._header_at(pos).msg_size
            if last < 0:
                raise ProtocolError("file descriptors received without a message start", fatal=True)
            self._fds[last] = self._fds.get(last, ()) + tuple(fds)
        return self._drain()

    def _feed_whole(self, data: bytes) -> list[Message]:
        """The common case: nothing buffered, no descriptors; slice messages out of ``data``."""
        out: list[Message] = []
        pos, end = 0, len(data)
        while end - pos >= HEADER_SIZE:
            hdr = self._header_at(pos, data)
            stop = pos + hdr.msg_size
            if stop > end:
                break
            out.append(Message(hdr, data[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos < end:
            self._buf += memoryview(data)[pos:]
        return out

    def _drain(self) -> list[Message]:
        out: list[Message] = []
        buf = self._buf
        pos, end = 0, len(buf)
        starts: list[int] = []
        try:
            while end - pos >= HEADER_SIZE:
                hdr = self._header_at(pos)
                stop = pos + hdr.msg_size
                if stop > end:
                    break
                with memoryview(buf) as view:
                    payload = bytes(view[pos + HEADER_SIZE : stop])
                out.append(Message(hdr, payload, self._fds.pop(pos, ()) if self._fds else ()))
                starts.append(pos)
                pos = stop
        except ProtocolError:
            # The complete messages are dropped with the stream; their fds go back
            # to pending_fds() so the caller's teardown closes them.
            for start, msg in zip(starts, out):
                if msg.fds:
                    self._fds[start] = msg.fds
            raise
        if pos:
            del buf[:pos]
            if self._fds:
                self._fds = {k - pos: v for k, v in self._fds.items()}
        return out
