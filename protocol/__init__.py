"""Sans-I/O implementation of the vfio-user wire protocol.

Pure data and codecs: no sockets, no trio, no imports from ``zpcid``.
"""

from protocol.errors import ProtocolError
from protocol.header import (
    HEADER,
    HEADER_SIZE,
    Command,
    Header,
    Flags,
)
from protocol.framing import Framer, Message
from protocol import consts, messages

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "Command",
    "Flags",
    "Framer",
    "Header",
    "Message",
    "ProtocolError",
    "consts",
    "messages",
]
