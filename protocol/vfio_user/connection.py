"""The vfio-user session rules, sans-I/O: one ``Connection`` per socket, either side.

Like h11, the object holds the protocol state and does no I/O: bytes (and the
descriptors that came with them) go in through ``receive_data`` and come out as
events; messages to send come out as bytes.  The daemon's endpoint and the
reference client both drive one, so each rule exists once:

* message ids: 16 bits, allocated here, never one still awaiting its reply;
* pending replies: a reply is matched to the request with its id *and* command,
  anything else is a stray reply (reported, never delivered to a waiter);
* classification: a message is a reply if its type says so, or if it carries
  the ERROR flag and answers a pending request (some peers set only ERROR);
* direction: only servers send DMA_READ/DMA_WRITE, only clients the rest;
* VERSION first, exactly once, and the negotiated limits (what each side may
  send the other: message size, descriptors per message, DMA maps).
"""

from __future__ import annotations

import enum
import errno
from typing import Any

import attrs

from protocol.errors import ProtocolError
from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.vfio_user.framing import Framer, Message
from protocol.vfio_user.header import (HEADER, HEADER_SIZE, KNOWN_FLAG_BITS, Command, Flags, error_reply,
                                       validate_flags)

# Largest fixed part in front of the data of any data-carrying message
# (REGION_READ/WRITE: 16 bytes, DMA_READ/WRITE: 16, REGION_WRITE_MULTI entries).
MAX_FIXED_PART = 64

ID_SPACE = 1 << 16

SERVER_SENT = frozenset({Command.DMA_READ, Command.DMA_WRITE})
_KNOWN = frozenset(int(c) for c in Command)
_TYPE_MASK = Flags.TYPE_MASK
_REPLY = Flags.REPLY
_ERROR = Flags.ERROR
_NO_REPLY = Flags.NO_REPLY


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    AWAIT_VERSION = "await-version"  # nothing but VERSION may pass
    READY = "ready"
    CLOSED = "closed"


class Request:
    """A command from the peer, to be answered (unless ``no_reply``)."""

    __slots__ = ("msg",)

    def __init__(self, msg: Message):
        self.msg = msg

    def __repr__(self) -> str:
        return f"Request({self.msg.header!r})"


class Reply:
    """The answer to one of our requests; ``token`` is what ``send_request`` was given."""

    __slots__ = ("msg", "token")

    def __init__(self, msg: Message, token: object):
        self.msg = msg
        self.token = token

    def __repr__(self) -> str:
        return f"Reply({self.msg.header!r})"


class StrayReply:
    """A reply to nothing we are waiting for (late, duplicated or mislabelled).

    Its descriptors are the caller's to close.
    """

    __slots__ = ("msg",)

    def __init__(self, msg: Message):
        self.msg = msg

    def __repr__(self) -> str:
        return f"StrayReply({self.msg.header!r})"


Event = Request | Reply | StrayReply


class Connection:
    """Protocol state of one vfio-user connection, seen from ``role``.

    ``caps`` is what this side offers: the largest data transfer and the most
    descriptors it accepts in one message, its DMA map limit and page sizes.
    """

    def __init__(self, role: Role, caps: M.Capabilities = M.Capabilities()):
        self.role = role
        self.our_caps = caps
        self.peer_caps: M.Capabilities | None = None
        self.version: tuple[int, int] | None = None
        self.state = State.AWAIT_VERSION
        self.framer = Framer(HEADER_SIZE + MAX_FIXED_PART + caps.max_data_xfer_size)
        self._pending: dict[int, tuple[int, object]] = {}  # msg_id -> (cmd, token)
        self._next_id = 1
        self._proposed_minor = 0
        self.stray_replies = 0

    # ------------------------------------------------------------------ limits
    @property
    def peer_max_xfer(self) -> int:
        """Largest data transfer the peer accepts in one message."""
        caps = self.peer_caps
        return caps.max_data_xfer_size if caps is not None else C.DEFAULT_MAX_DATA_XFER_SIZE

    @property
    def dma_chunk(self) -> int:
        """Largest DMA_READ/DMA_WRITE: the reply to a read must fit what we accept, too."""
        return min(self.peer_max_xfer, self.our_caps.max_data_xfer_size)

    def check_xfer(self, count: int) -> None:
        """A data transfer the peer asked of us must stay within what we offered."""
        if count > self.our_caps.max_data_xfer_size:
            raise ProtocolError(f"count {count} exceeds max_data_xfer_size", errno.E2BIG)

    @property
    def pending(self) -> int:
        """Requests sent and still awaiting their reply."""
        return len(self._pending)

    # ------------------------------------------------------------------ inbound
    def receive_data(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> list[Event]:
        """Feed received bytes (and their descriptors); return the events they complete.

        A ``ProtocolError`` here is always fatal: the stream cannot be framed any
        more.  The caller then owns ``fds`` and ``framer.pending_fds()``.
        """
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed", fatal=True)
        out: list[Event] = []
        pending = self._pending
        for msg in self.framer.feed(data, fds):
            h = msg.header
            flags = h.flags
            if flags & _TYPE_MASK == _REPLY or (flags & _ERROR and h.msg_id in pending):
                entry = pending.get(h.msg_id)
                if entry is None or entry[0] != h.cmd:
                    self.stray_replies += 1
                    out.append(StrayReply(msg))
                else:
                    del pending[h.msg_id]
                    out.append(Reply(msg, entry[1]))
            else:
                out.append(Request(msg))
        return out

    def check_request(self, msg: Message) -> None:
        """Raise ``ProtocolError`` (answer with its errno) unless ``msg`` may be served now.

        VERSION is handled by ``accept_version``; here it is a second one.
        """
        h = msg.header
        validate_flags(h.flags)
        if h.flags & _ERROR:
            raise ProtocolError("ERROR flag set on a command")
        if self.state is not State.READY:
            raise ProtocolError("first message must be VERSION")
        if h.cmd == Command.VERSION:
            raise ProtocolError("VERSION already negotiated")
        if h.cmd not in _KNOWN:
            raise ProtocolError(f"unknown or unsupported command {h.cmd}", errno.ENOSYS)
        if (h.cmd in SERVER_SENT) != (self.role is Role.CLIENT):
            sender = "servers" if h.cmd in SERVER_SENT else "clients"
            raise ProtocolError(f"command {h.cmd} is sent by {sender} only",
                                errno.EINVAL if self.role is Role.SERVER else errno.ENOSYS)

    # ------------------------------------------------------------------ outbound
    def _allocate_id(self) -> int:
        if len(self._pending) >= ID_SPACE:
            raise ProtocolError("every message id is awaiting a reply", errno.EAGAIN)
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        return msg_id

    def send_request(self, cmd: int, payload: bytes = b"", *, no_reply: bool = False,
                     token: object = None) -> tuple[int, bytes]:
        """The bytes of a new request and its id; its reply will carry ``token``."""
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed", errno.ESHUTDOWN)
        if (cmd in SERVER_SENT) != (self.role is Role.SERVER):
            raise ValueError(f"a {self.role.value} does not send command {cmd}")
        if cmd == Command.VERSION:
            if self.state is not State.AWAIT_VERSION or self._pending:
                raise ProtocolError("VERSION already sent")
        elif self.state is not State.READY:
            raise ProtocolError("VERSION must be negotiated first")
        msg_id = self._allocate_id()
        if not no_reply:
            self._pending[msg_id] = (cmd, token)
        header = HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), _NO_REPLY if no_reply else 0, 0)
        return msg_id, header + payload if payload else header

    def forget(self, msg_id: int) -> None:
        """We stopped waiting for this reply (timeout, cancellation); a late one is stray."""
        self._pending.pop(msg_id, None)

    def reply(self, msg: Message, payload: bytes = b"") -> bytes | None:
        """The reply to a peer's request, or None when it asked for no reply."""
        h = msg.header
        if h.flags & _NO_REPLY:
            return None
        return HEADER.pack(h.msg_id, h.cmd, HEADER_SIZE + len(payload), _REPLY, 0) + payload

    def error(self, msg: Message, errno_: int) -> bytes | None:
        """A header-only error reply, or None when the request asked for no reply."""
        h = msg.header
        if h.flags & _NO_REPLY:
            return None
        return error_reply(h.msg_id, h.cmd, errno_)

    def close(self) -> list[object]:
        """No more traffic; returns the tokens of requests that will never be answered."""
        self.state = State.CLOSED
        tokens = [token for _, token in self._pending.values()]
        self._pending.clear()
        return tokens

    # ------------------------------------------------------------------ hand-over
    def export_state(self) -> dict[str, Any]:
        """The negotiated state as plain data, for continuing the connection elsewhere.

        Only between messages with no request of ours awaiting a reply (the
        tokens of those could not travel); the framer's buffer goes separately.
        """
        if self._pending:
            raise ValueError(f"{len(self._pending)} requests await their reply")
        return {
            "role": self.role.value, "state": self.state.name,
            "version": list(self.version) if self.version else None,
            "our_caps": attrs.asdict(self.our_caps),
            "peer_caps": attrs.asdict(self.peer_caps) if self.peer_caps is not None else None,
            "next_id": self._next_id, "proposed_minor": self._proposed_minor,
            "stray_replies": self.stray_replies,
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> "Connection":
        """Inverse of ``export_state``; raises ValueError/TypeError/KeyError on bad input."""
        conn = cls(Role(d["role"]), M.Capabilities(**d["our_caps"]))
        conn.state = State[d["state"]]
        if conn.state is State.CLOSED:
            raise ValueError("a closed connection cannot continue")
        conn.version = tuple(d["version"]) if d["version"] is not None else None
        conn.peer_caps = M.Capabilities(**d["peer_caps"]) if d["peer_caps"] is not None else None
        conn._next_id = int(d["next_id"]) & 0xFFFF
        conn._proposed_minor = int(d["proposed_minor"])
        conn.stray_replies = int(d["stray_replies"])
        return conn

    # ------------------------------------------------------------------ negotiation
    def version_request(self, minor: int = 0, *, token: object = None) -> tuple[int, bytes]:
        """Client: the VERSION request proposing ``our_caps``."""
        if self.role is not Role.CLIENT:
            raise ValueError("only a client proposes a version")
        msg_id, data = self.send_request(Command.VERSION, M.Version(0, minor, self.our_caps).pack(),
                                         token=token)
        self._proposed_minor = minor
        return msg_id, data

    def version_accepted(self, reply: Reply) -> M.Version:
        """Client: take the server's VERSION reply; raise ``ProtocolError`` if unacceptable."""
        msg = reply.msg
        if msg.header.cmd != Command.VERSION:
            raise ValueError("not a VERSION reply")
        if msg.header.flags & _ERROR:
            raise ProtocolError(f"server refused VERSION (errno {msg.header.error_no})",
                                msg.header.error_no or errno.EINVAL)
        v = M.Version.unpack(msg.payload)
        if v.major != 0 or v.minor > self._proposed_minor:
            raise ProtocolError(f"server answered version {v.major}.{v.minor}")
        self._negotiated(v)
        return v

    def accept_version(self, msg: Message) -> bytes | None:
        """Server: answer the first message, which must be an acceptable VERSION.

        Raises ``ProtocolError`` (answer with its errno, then hang up) otherwise.
        """
        if self.role is not Role.SERVER:
            raise ValueError("only a server accepts a version")
        if self.state is not State.AWAIT_VERSION:
            raise ProtocolError("VERSION already negotiated")
        if msg.header.cmd != Command.VERSION:
            raise ProtocolError("first message must be VERSION")
        if msg.header.flags & (~KNOWN_FLAG_BITS | _ERROR):
            raise ProtocolError(f"VERSION with flags {msg.header.flags:#x}")
        if msg.fds:
            raise ProtocolError("VERSION must not carry descriptors")
        req = M.Version.unpack(msg.payload)
        if req.major != 0:
            raise ProtocolError(f"unsupported major version {req.major}", errno.ENOTSUP)
        ours, theirs = self.our_caps, req.capabilities
        caps = M.Capabilities(
            max_msg_fds=ours.max_msg_fds,
            max_data_xfer_size=ours.max_data_xfer_size,
            max_dma_maps=min(ours.max_dma_maps, theirs.max_dma_maps or ours.max_dma_maps),
            pgsizes=ours.pgsizes,
            write_multiple=theirs.write_multiple,
        )
        # Minor 0 is all this side needs, and QEMU rejects anything above what it proposed.
        answer = M.Version(0, 0, caps)
        self._negotiated(M.Version(0, 0, theirs))
        self.our_caps = caps
        return self.reply(msg, answer.pack())

    def _negotiated(self, v: M.Version) -> None:
        self.peer_caps = v.capabilities
        self.version = (v.major, v.minor)
        self.state = State.READY
