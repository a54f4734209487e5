"""The sans-I/O vfio-user session rules (protocol.vfio_user.connection), with no socket at all."""

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ErrnoError, ProtocolError
from protocol.vfio_user import messages as M
from protocol.vfio_user.connection import (ID_SPACE, Connection, Reply, Request, Role, State,
                                           StrayReply)
from protocol.vfio_user.framing import Message
from protocol.vfio_user.header import HEADER, HEADER_SIZE, Command, Flags, Header

SERVER_CAPS = M.Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, max_dma_maps=1000,
                             write_multiple=True)
CLIENT_CAPS = M.Capabilities(max_msg_fds=8, max_data_xfer_size=1 << 16, max_dma_maps=65535,
                             write_multiple=True)


def raw(msg_id, cmd, payload=b"", flags=0, error_no=0) -> bytes:
    return HEADER.pack(msg_id, cmd, HEADER_SIZE + len(payload), flags, error_no) + payload


def one(events):
    assert len(events) == 1, events
    return events[0]


def pair(server_caps=SERVER_CAPS, client_caps=CLIENT_CAPS):
    """A client and a server connection, negotiated by passing bytes between them."""
    client, server = Connection(Role.CLIENT, client_caps), Connection(Role.SERVER, server_caps)
    _, data = client.version_request(token="v")
    req = one(server.receive_data(data))
    assert isinstance(req, Request) and req.msg.header.cmd == Command.VERSION
    rep = one(client.receive_data(server.accept_version(req.msg)))
    assert isinstance(rep, Reply) and rep.token == "v"
    client.version_accepted(rep)
    return client, server


def test_negotiation_limits_on_both_sides():
    client, server = pair()
    assert client.state is server.state is State.READY
    assert client.version == server.version == (0, 0)
    # Each side learns what the other accepts; DMA maps are the smaller limit.
    assert client.peer_caps.max_dma_maps == 1000 and server.our_caps.max_dma_maps == 1000
    assert client.peer_max_xfer == 1 << 20 and server.peer_max_xfer == 1 << 16
    assert server.peer_caps.max_msg_fds == 8 and client.peer_caps.max_msg_fds == 16
    # The server's DMA_READ replies carry data back, so both limits apply.
    assert server.dma_chunk == 1 << 16
    server.check_xfer(1 << 20)
    with pytest.raises(ProtocolError) as e:
        server.check_xfer((1 << 20) + 1)
    assert e.value.errno == errno.E2BIG
    # Each side frames what it offered to accept, no more.
    assert server.framer.max_msg_size >= HEADER_SIZE + 16 + (1 << 20)
    assert client.framer.max_msg_size < server.framer.max_msg_size


def test_version_first_and_once():
    server = Connection(Role.SERVER, SERVER_CAPS)
    info = one(server.receive_data(raw(1, Command.DEVICE_GET_INFO, bytes(16))))
    with pytest.raises(ProtocolError, match="first message must be VERSION"):
        server.check_request(info.msg)
    with pytest.raises(ProtocolError, match="first message must be VERSION"):
        server.accept_version(info.msg)
    client, server = pair()
    again = one(server.receive_data(raw(2, Command.VERSION, M.Version(0, 0, CLIENT_CAPS).pack())))
    with pytest.raises(ProtocolError, match="already"):
        server.check_request(again.msg)
    with pytest.raises(ProtocolError, match="already"):
        server.accept_version(again.msg)
    with pytest.raises(ProtocolError, match="already"):
        client.version_request()
    # A client sends nothing before its VERSION is answered.
    fresh = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError, match="VERSION must be negotiated first"):
        fresh.send_request(Command.DEVICE_GET_INFO, bytes(16))


@pytest.mark.parametrize("payload,err", [
    (struct.pack("<HH", 1, 0) + b"{}\0", errno.ENOTSUP),
    (struct.pack("<HH", 0, 0) + b"{", errno.EINVAL),
    (b"\0", errno.EINVAL),
])
def test_unacceptable_version_requests(payload, err):
    server = Connection(Role.SERVER, SERVER_CAPS)
    req = one(server.receive_data(raw(1, Command.VERSION, payload)))
    with pytest.raises(ProtocolError) as e:
        server.accept_version(req.msg)
    assert e.value.errno == err and server.state is State.AWAIT_VERSION


def test_version_with_descriptors_is_refused():
    server = Connection(Role.SERVER, SERVER_CAPS)
    msg = Message(Header(1, Command.VERSION, HEADER_SIZE + 7), struct.pack("<HH", 0, 0) + b"{}\0", (5,))
    with pytest.raises(ProtocolError, match="descriptors"):
        server.accept_version(msg)


def test_client_refuses_a_higher_minor_or_major():
    for major, minor in ((0, 1), (1, 0)):
        client = Connection(Role.CLIENT, CLIENT_CAPS)
        msg_id, _ = client.version_request(minor=0)
        answer = M.Version(major, minor, SERVER_CAPS).pack()
        rep = one(client.receive_data(raw(msg_id, Command.VERSION, answer, Flags.REPLY)))
        with pytest.raises(ProtocolError, match="server answered version"):
            client.version_accepted(rep)
        assert client.state is State.AWAIT_VERSION


def test_error_reply_to_version_is_an_error_with_the_servers_errno():
    client = Connection(Role.CLIENT, CLIENT_CAPS)
    msg_id, _ = client.version_request()
    rep = one(client.receive_data(raw(msg_id, Command.VERSION, b"", Flags.REPLY | Flags.ERROR, errno.EBUSY)))
    with pytest.raises(ErrnoError) as e:
        client.version_accepted(rep)
    assert e.value.errno == errno.EBUSY


def test_replies_match_by_id_and_command():
    client, server = pair()
    msg_id, data = client.send_request(Command.REGION_READ, struct.pack("<QII", 0, 4, 4), token="t")
    assert client.pending == 1
    # Same id, other command: stray, and ours is still awaited.
    stray = one(client.receive_data(raw(msg_id, Command.REGION_WRITE, b"", Flags.REPLY)))
    assert isinstance(stray, StrayReply) and client.pending == 1
    # An id nobody asked for.
    assert isinstance(one(client.receive_data(raw(msg_id + 1, Command.REGION_READ, b"", Flags.REPLY))),
                      StrayReply)
    req = one(server.receive_data(data))
    rep = one(client.receive_data(server.reply(req.msg, struct.pack("<QII", 0, 4, 4) + b"abcd")))
    assert isinstance(rep, Reply) and rep.token == "t" and client.pending == 0
    # The same reply again is late: stray.
    assert isinstance(one(client.receive_data(server.reply(req.msg, b""))), StrayReply)
    assert client.stray_replies == 3


def test_error_flag_alone_answers_a_pending_request_else_is_a_bad_command():
    client, server = pair()
    msg_id, _ = server.send_request(Command.DMA_READ, struct.pack("<QQ", 0x1000, 8), token="dma")
    # Some peers set only ERROR (type bits 0): still the reply to our request.
    rep = one(server.receive_data(raw(msg_id, Command.DMA_READ, b"", Flags.ERROR, errno.EFAULT)))
    assert isinstance(rep, Reply) and rep.token == "dma" and rep.msg.header.error_no == errno.EFAULT
    # Not answering anything: a command with ERROR set, which is refused.
    cmd = one(server.receive_data(raw(77, Command.DEVICE_RESET, b"", Flags.ERROR)))
    assert isinstance(cmd, Request)
    with pytest.raises(ProtocolError, match="ERROR flag"):
        server.check_request(cmd.msg)


@pytest.mark.parametrize("flags", [0x40, 0x2, 0x80 | 0x10])
def test_bad_flag_bits_are_refused(flags):
    _, server = pair()
    req = one(server.receive_data(raw(3, Command.DEVICE_RESET, b"", flags)))
    with pytest.raises(ProtocolError):
        server.check_request(req.msg)


def test_direction_of_commands():
    client, server = pair()
    dma = one(server.receive_data(raw(4, Command.DMA_READ, struct.pack("<QQ", 0, 4))))
    with pytest.raises(ProtocolError, match="sent by servers only") as e:
        server.check_request(dma.msg)
    assert e.value.errno == errno.EINVAL
    reg = one(client.receive_data(raw(5, Command.REGION_READ, struct.pack("<QII", 0, 0, 4))))
    with pytest.raises(ProtocolError, match="sent by clients only") as e:
        client.check_request(reg.msg)
    assert e.value.errno == errno.ENOSYS
    client.check_request(one(client.receive_data(raw(6, Command.DMA_WRITE, bytes(16)))).msg)
    with pytest.raises(ValueError):
        server.send_request(Command.REGION_READ, bytes(16))
    with pytest.raises(ValueError):
        client.send_request(Command.DMA_READ, bytes(16))
    unknown = one(server.receive_data(raw(7, 99)))
    with pytest.raises(ProtocolError) as e:
        server.check_request(unknown.msg)
    assert e.value.errno == errno.ENOSYS


def test_no_reply_requests_are_not_awaited_and_get_no_reply():
    client, server = pair()
    msg_id, data = client.send_request(Command.REGION_WRITE, struct.pack("<QII", 0, 4, 1) + b"x",
                                       no_reply=True)
    assert client.pending == 0
    req = one(server.receive_data(data))
    assert req.msg.header.flags == Flags.NO_REPLY
    assert server.reply(req.msg, b"") is None and server.error(req.msg, errno.EIO) is None


def test_error_reply_is_header_only_with_the_errno():
    _, server = pair()
    req = one(server.receive_data(raw(9, Command.DEVICE_RESET)))
    h = Header.unpack(server.error(req.msg, errno.ENOSPC))
    assert (h.msg_id, h.cmd, h.msg_size, h.error_no) == (9, Command.DEVICE_RESET, HEADER_SIZE, errno.ENOSPC)
    assert h.is_reply and h.is_error


def test_close_hands_back_every_pending_token_and_refuses_more():
    client, _ = pair()
    for i in range(3):
        client.send_request(Command.DEVICE_RESET, token=i)
    assert sorted(client.close()) == [0, 1, 2]
    assert client.state is State.CLOSED and client.pending == 0
    with pytest.raises(ProtocolError):
        client.send_request(Command.DEVICE_RESET)
    with pytest.raises(ProtocolError):
        client.receive_data(raw(1, Command.DEVICE_RESET, b"", Flags.REPLY))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=200))
def test_message_ids_are_never_shared_by_two_pending_requests(ops):
    """Send/answer in any order, across the 16-bit wrap: every pending id is unique."""
    client, server = pair()
    client._next_id = ID_SPACE - 50  # start close to the wrap
    pending: dict[int, int] = {}
    token = 0
    for send, pick in ops:
        if send or not pending:
            token += 1
            msg_id, data = client.send_request(Command.DEVICE_RESET, token=token)
            assert msg_id not in pending and 0 <= msg_id < ID_SPACE
            pending[msg_id] = token
        else:
            msg_id = sorted(pending)[pick % len(pending)]
            rep = one(client.receive_data(raw(msg_id, Command.DEVICE_RESET, b"", Flags.REPLY)))
            assert isinstance(rep, Reply) and rep.token == pending.pop(msg_id)
    assert client.pending == len(pending)


def test_allocation_skips_ids_still_pending_after_a_wrap():
    client, _ = pair()
    first, _ = client.send_request(Command.DEVICE_RESET, token="old")
    for _ in range(ID_SPACE - 1):
        msg_id, _ = client.send_request(Command.DEVICE_RESET, no_reply=True)
        assert msg_id != first
    # The id space came round to ``first``, which is still pending: skipped.
    nxt, _ = client.send_request(Command.DEVICE_RESET, token="new")
    assert nxt != first


_stream_items = st.lists(
    st.tuples(st.sampled_from(["reply", "stray", "dma"]), st.binary(max_size=40)),
    min_size=1, max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(_stream_items, st.data())
def test_events_do_not_depend_on_how_the_stream_is_cut(items, data):
    """Replies, stray replies and server commands, delivered in arbitrary pieces."""

    def run(cuts):
        client, _ = pair()
        blob, expect = b"", []
        for kind, payload in items:
            if kind == "reply":
                msg_id, _ = client.send_request(Command.DEVICE_GET_INFO, bytes(16), token=len(expect))
                blob += raw(msg_id, Command.DEVICE_GET_INFO, payload, Flags.REPLY)
                expect.append(("Reply", len(expect)))
            elif kind == "stray":
                blob += raw(0xFFFF, Command.DMA_MAP, payload, Flags.REPLY)
                expect.append(("StrayReply", None))
            else:
                blob += raw(0x1234, Command.DMA_READ, payload)
                expect.append(("Request", None))
        got, pos = [], 0
        for cut in sorted(c % (len(blob) + 1) for c in cuts) + [len(blob)]:
            got += client.receive_data(blob[pos:cut])
            pos = max(pos, cut)
        seen = [(type(e).__name__, getattr(e, "token", None)) for e in got]
        return seen, expect, [e.msg.payload for e in got]

    cuts = data.draw(st.lists(st.integers(0, 10_000), max_size=8))
    seen, expect, payloads = run(cuts)
    assert seen == expect
    assert payloads == [p for _, p in items]
