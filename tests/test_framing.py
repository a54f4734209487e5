"""Framer: any chunking of a message stream reassembles identically, fds land on the right message."""

import errno
import os
import socket
import array

import pytest
from hypothesis import given, settings, strategies as st

from protocol.errors import ProtocolError
from protocol.vfio_user.framing import DEFAULT_MAX_MSG_SIZE, Framer, Message
from protocol.vfio_user.header import HEADER_SIZE, Header

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def streams(draw, max_messages=12, with_fds=True):
    """Messages as (header, payload, fds); fd numbers are just labels to the Framer."""
    n = draw(st.integers(1, max_messages))
    out, label = [], 1000
    for i in range(n):
        payload = draw(st.binary(max_size=80))
        fds = ()
        if with_fds and draw(st.booleans()):
            k = draw(st.integers(1, 3))
            fds = tuple(range(label, label + k))
            label += k
        hdr = Header(i & 0xFFFF, draw(st.integers(1, 18)), HEADER_SIZE + len(payload),
                     draw(st.sampled_from([0, 1, 0x10, 0x21])), draw(st.integers(0, 200)))
        out.append((hdr, payload, fds))
    return out


def _bytes(stream):
    return b"".join(h.pack() + p for h, p, _ in stream)


def _expected(stream):
    return [Message(h, p, fds) for h, p, fds in stream]


@SETTINGS
@given(streams(with_fds=False), st.data())
def test_any_chunking_reassembles(stream, data):
    blob = _bytes(stream)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(blob)), max_size=40))))
    framer, got, prev = Framer(), [], 0
    for cut in cuts + [len(blob)]:
        got += framer.feed(blob[prev:cut])
        prev = cut
    assert got == _expected(stream)
    assert framer.buffered == 0 and framer.pending_fds() == []


@SETTINGS
@given(streams(with_fds=False))
def test_byte_at_a_time(stream):
    blob = _bytes(stream)
    framer, got = Framer(), []
    for i in range(len(blob)):
        got += framer.feed(blob[i : i + 1])
    assert got == _expected(stream)


def linux_chunks(stream, cuts):
    """Split the stream the way a Linux AF_UNIX recvmsg can, each message sent by one sendmsg.

    Ancillary fds come with the read that takes the first byte of their sendmsg, and
    that read stops at the end of the sendmsg's bytes at the latest.  So the chunk
    holding the start of a message with fds never extends past that message's end.
    """
    starts, ends, pos = [], [], 0
    for h, _, _ in stream:
        starts.append(pos)
        pos += h.msg_size
        ends.append(pos)
    total = pos
    cuts = sorted(set(c for c in cuts if 0 < c < total))
    bounds = [0] + cuts + [total]
    chunks = []
    i = 0
    while i < len(bounds) - 1:
        lo, hi = bounds[i], bounds[i + 1]
        fds: tuple = ()
        for (h, _, mfds), s, e in zip(stream, starts, ends):
            if mfds and lo <= s < hi:
                if hi > e:  # the kernel would have stopped this read at the end of the sendmsg
                    bounds.insert(i + 1, e)
                    hi = e
                fds = mfds
                break
        chunks.append((lo, hi, fds))
        i += 1
    return chunks


@SETTINGS
@given(streams(), st.data())
def test_fds_attach_to_their_message_under_any_split(stream, data):
    blob = _bytes(stream)
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=40))
    framer, got = Framer(), []
    for lo, hi, fds in linux_chunks(stream, cuts):
        got += framer.feed(blob[lo:hi], fds)
    assert got == _expected(stream)
    assert framer.pending_fds() == []


def test_fds_with_message_still_incomplete_are_pending():
    framer = Framer()
    h = Header(1, 2, HEADER_SIZE + 32)
    assert framer.feed(h.pack()[:10], [7, 8]) == []
    assert framer.pending_fds() == [7, 8]
    assert framer.feed(h.pack()[10:] + bytes(31)) == []
    (msg,) = framer.feed(b"\0")
    assert msg.fds == (7, 8) and framer.pending_fds() == []


def test_fds_without_a_message_start_are_fatal():
    framer = Framer()
    h = Header(1, 2, HEADER_SIZE + 32)
    framer.feed(h.pack() + bytes(4))
    with pytest.raises(ProtocolError) as ei:
        framer.feed(bytes(4), [5])
    assert ei.value.fatal


def test_fds_of_complete_messages_before_a_fatal_header_stay_closable():
    framer = Framer()
    a = Header(1, 2, HEADER_SIZE + 8).pack() + bytes(8)
    assert framer.feed(a[:4], [11]) == []
    with pytest.raises(ProtocolError):
        framer.feed(a[4:] + Header(2, 2, 3).pack())
    # Message 1 was complete but is lost with the stream; its fd must not be.
    assert framer.pending_fds() == [11]


@pytest.mark.parametrize("size", [0, 1, HEADER_SIZE - 1])
def test_undersize_msg_size_is_fatal(size):
    with pytest.raises(ProtocolError) as ei:
        Framer().feed(Header(1, 4, size).pack() + bytes(32))
    assert ei.value.fatal and ei.value.errno == errno.EINVAL


def test_oversize_msg_size_is_fatal_before_the_body_arrives():
    framer = Framer(max_msg_size=4096)
    with pytest.raises(ProtocolError) as ei:
        framer.feed(Header(1, 10, 4097).pack())
    assert ei.value.fatal and ei.value.errno == errno.E2BIG
    # The default limit fits a maximal 1 MiB data transfer plus its fixed part.
    assert DEFAULT_MAX_MSG_SIZE >= HEADER_SIZE + 16 + (1 << 20)
    Framer().feed(Header(1, 10, HEADER_SIZE + 16 + (1 << 20)).pack())
    with pytest.raises(ProtocolError):
        Framer().feed(Header(1, 10, 0xFFFFFFFF).pack())


def test_bad_size_behind_a_good_message_is_still_fatal():
    good = Header(1, 4, HEADER_SIZE + 4).pack() + bytes(4)
    with pytest.raises(ProtocolError):
        Framer().feed(good + Header(2, 4, 3).pack())


# --------------------------------------------------------------------------- the real kernel


def _send_all(sock, stream, fd_for):
    for h, p, fds in stream:
        real = [fd_for[label] for label in fds]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", real))] if real else []
        assert sock.sendmsg([h.pack() + p], anc) == h.msg_size


@settings(max_examples=40, deadline=None)
@given(streams(max_messages=8), st.lists(st.integers(1, 200), min_size=1, max_size=30))
def test_model_matches_linux(stream, reads):
    """Feed the Framer from real recvmsg calls of random sizes; fds must match by inode."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    labels = [label for _, _, fds in stream for label in fds]
    pipes = {label: os.pipe() for label in labels}
    fd_for = {label: pipes[label][0] for label in labels}
    received: list[int] = []
    try:
        _send_all(a, stream, fd_for)
        a.shutdown(socket.SHUT_WR)
        framer, got, i = Framer(), [], 0
        while True:
            data, anc, flags, _ = b.recvmsg(reads[i % len(reads)], socket.CMSG_SPACE(16 * 4))
            i += 1
            fds = []
            for _, _, blob in anc:
                arr = array.array("i")
                arr.frombytes(blob)
                fds += list(arr)
            received += fds
            if not data:
                break
            got += framer.feed(data, fds)
        assert [m.header for m in got] == [h for h, _, _ in stream]
        for msg, (_, payload, labels_) in zip(got, stream):
            assert msg.payload == payload
            assert [os.fstat(fd).st_ino for fd in msg.fds] == [
                os.fstat(fd_for[lab]).st_ino for lab in labels_]
    finally:
        for fd in received:
            os.close(fd)
        for r, w in pipes.values():
            os.close(r)
            os.close(w)
        a.close()
        b.close()
