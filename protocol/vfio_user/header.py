"""The 16-byte message header that starts every command and reply."""

import enum
import struct
from typing import NamedTuple

from protocol.errors import ProtocolError

HEADER = struct.Struct("<HHIII")
HEADER_SIZE = HEADER.size


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


class Flags:
    """Header flag bits (plain ints: IntFlag arithmetic is slow on the hot path)."""

    TYPE_MASK = 0xF
    COMMAND = 0x0
    REPLY = 0x1
    NO_REPLY = 0x10
    ERROR = 0x20


KNOWN_FLAG_BITS = Flags.TYPE_MASK | Flags.NO_REPLY | Flags.ERROR


class Header(NamedTuple):
    """A decoded header (a tuple: made once per message, so it must be cheap)."""

    msg_id: int
    cmd: int
    msg_size: int
    flags: int = 0
    error_no: int = 0

    @property
    def is_reply(self) -> bool:
        return (self.flags & Flags.TYPE_MASK) == Flags.REPLY

    @property
    def is_error(self) -> bool:
        return bool(self.flags & Flags.ERROR)

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & Flags.NO_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.msg_id, self.cmd, self.msg_size, self.flags, self.error_no)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "Header":
        if len(data) < HEADER_SIZE:
            raise ProtocolError("truncated header", fatal=True)
        return cls._make(HEADER.unpack_from(data))


def pack_header(msg_id: int, cmd: int, payload_len: int, flags: int = 0, error_no: int = 0) -> bytes:
    """Pack a header for a message whose payload is ``payload_len`` bytes."""
    return HEADER.pack(msg_id & 0xFFFF, cmd, HEADER_SIZE + payload_len, flags, error_no)


def error_reply(msg_id: int, cmd: int, errno: int) -> bytes:
    """A header-only error reply, as the protocol specifies."""
    return HEADER.pack(msg_id, cmd, HEADER_SIZE, Flags.REPLY | Flags.ERROR, errno)


def validate_flags(flags: int) -> None:
    if flags & ~KNOWN_FLAG_BITS:
        raise ProtocolError(f"reserved header flag bits set: {flags:#x}")
    if (flags & Flags.TYPE_MASK) not in (Flags.COMMAND, Flags.REPLY):
        raise ProtocolError(f"unknown message type {flags & Flags.TYPE_MASK}")
