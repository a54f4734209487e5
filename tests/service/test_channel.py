"""The supervisor/worker channel: frames, descriptors riding with their frame, bounds."""

import os
import struct

import pytest
import trio
import trio.testing

from zpcid.service import channel as ch


def pair():
    a, b = ch.socketpair()
    return ch.Channel(a), ch.Channel(b)


async def test_frames_carry_their_own_descriptors():
    a, b = pair()
    r, w = os.pipe()
    try:
        # Three frames back to back, descriptors only on the middle one (larger than
        # the socket buffer, so it goes out in several writes).
        async def sender():
            await a.send({"n": 1})
            await a.send({"n": 2, "blob": "x" * 300_000}, [r, w])
            await a.send({"n": 3})
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                m1, f1 = await b.recv()
                m2, f2 = await b.recv()
                m3, f3 = await b.recv()
        assert (m1, f1, m3, f3) == ({"n": 1}, [], {"n": 3}, [])
        assert m2["n"] == 2 and len(m2["blob"]) == 300_000 and len(f2) == 2
        os.write(f2[1], b"through the passed pipe")
        assert os.read(r, 100) == b"through the passed pipe"
        for fd in f2:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


async def test_sync_and_trio_ends_speak_the_same_framing():
    s1, s2 = ch.socketpair()
    sync = ch.SyncChannel(s1)
    b = ch.Channel(s2)
    sync.send({"op": "spawn"}, [s1.fileno()])
    msg, fds = await b.recv()
    assert msg == {"op": "spawn"} and len(fds) == 1
    os.close(fds[0])
    await b.send({"id": 1, "ok": True})
    assert sync.recv() == ({"id": 1, "ok": True}, [])
    s1.close()
    b.close()


async def test_oversized_deep_or_non_object_frames_are_refused():
    for raw, why in ((struct.pack("<I", ch.MAX_FRAME + 1), "announced a frame"),
                     (struct.pack("<I", 1000) + b"[" * 1000, "nested deeper"),
                     (struct.pack("<I", 2) + b"[]", "not a JSON object"),
                     (struct.pack("<I", 3) + b"{x}", "not JSON")):
        s1, s2 = ch.socketpair()
        b = ch.Channel(s2)
        s1.sendall(raw)
        with pytest.raises(ch.ChannelError, match=why):
            await b.recv()
        s1.close()
        b.close()
    with pytest.raises(ch.ChannelError):
        ch.encode({"x": "y" * (ch.MAX_FRAME + 1)})


async def test_peer_gone_is_closed():
    a, b = pair()
    a.close()
    with pytest.raises(ch.Closed):
        await b.recv()
    s1, s2 = ch.socketpair()
    s1.sendall(struct.pack("<I", 10) + b"{")  # dies mid-frame
    s1.close()
    c = ch.Channel(s2)
    with trio.fail_after(5):
        with pytest.raises(ch.Closed):
            await c.recv()
    c.close()
    b.close()


async def test_a_cancelled_reader_or_writer_leaves_the_channel_at_a_frame_boundary():
    """An upgrade stops reading a worker's channel and passes the socket on: a frame
    begun when the reader (or writer) is cancelled is finished first, so the next owner
    starts at a frame boundary."""
    a, b = pair()
    body = b'{"n":1,"pad":"' + b"x" * 1000 + b'"}'
    frame = struct.pack("<I", len(body)) + body
    await a.sock.send(frame[:200])  # the prefix and part of the body only
    got = []
    async with trio.open_nursery() as n:
        scope = trio.CancelScope()

        async def reader():
            with scope:
                got.append(await b.recv())

        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()  # it has the prefix, waits for the rest
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == []  # still waiting for its frame
        await a.sock.send(frame[200:])
    assert got[0][0]["n"] == 1  # finished despite the cancel
    await a.send({"n": 2})
    assert (await b.recv())[0] == {"n": 2}  # the next frame starts where it should

    big = {"n": 3, "blob": "y" * 600_000}  # more than the socket buffer
    async with trio.open_nursery() as n:
        scope = trio.CancelScope()

        async def writer():
            with scope:
                await a.send(big)

        n.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()  # part sent, waiting for buffer space
        scope.cancel()
        assert (await b.recv())[0] == big
    await a.send({"n": 4})
    assert (await b.recv())[0] == {"n": 4}
    a.close()
    b.close()
