"""Sans-I/O implementation of the vfio-user wire protocol.

Pure data and codecs: no sockets, no trio, no imports from ``zpcid``.
"""

from protocol.errors import ProtocolError
from protocol.vfio_user.header import (
    HEADER,
    HEADER_SIZE,
    Command,
    Header,
    Flags,
)
from protocol.vfio_user.framing import Framer, Message
from protocol.vfio_user import consts
from protocol.vfio_user import messages

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
