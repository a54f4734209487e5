"""zpcid.devices.uring: the io_uring engine against real files, from a real trio loop."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
import trio

from zpcid.devices import uring


@pytest.fixture
def ring():
    try:
        r = uring.Ring(8)
    except uring.Unavailable as exc:
        pytest.skip(f"no io_uring here: {exc}")
    yield r
    r.close()


def views_of(buf: mmap.mmap, *pieces: tuple[int, int]) -> list[memoryview]:
    return [memoryview(buf)[off : off + n] for off, n in pieces]


async def test_vectored_write_read_and_sync_reach_the_file(ring, tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    buf = mmap.mmap(-1, 3 * 4096)
    try:
        buf[:] = bytes(range(256)) * 48
        async with trio.open_nursery() as n:
            n.start_soon(ring.reaper, lambda: False)
            out = views_of(buf, (5, 1000), (4096, 3000))
            assert await ring.pwritev(fd, out, 512) == 4000
            assert await ring.fdatasync(fd) == 0
            back = mmap.mmap(-1, 8192)
            into = views_of(back, (0, 2500), (4096, 1500))
            assert await ring.preadv(fd, into, 512) == 4000
            assert back[:2500] + back[4096:5596] == buf[5:1005] + buf[4096:7096]
            # Errors come back as -errno, the ring carries on.
            ro = os.open(path, os.O_RDONLY)
            assert await ring.pwritev(ro, out, 0) == -errno.EBADF
            os.close(ro)
            assert await ring.preadv(fd, into, 100_000) == 0  # past the end
            for v in out + into:
                v.release()
            back.close()
            n.cancel_scope.cancel()
        with open(path, "rb") as f:
            assert f.read()[512:] == buf[5:1005] + buf[4096:7096]
    finally:
        os.close(fd)
        buf.close()


async def test_a_cancelled_caller_still_waits_for_its_operation(ring, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(4096)
    try:
        async with trio.open_nursery() as n:
            n.start_soon(ring.reaper, lambda: False)
            with trio.CancelScope() as cs:
                cs.cancel()
                # Cancelled before it even waits: the kernel owns the buffer, so the
                # call returns only with the completion.
                got = await ring.preadv(fd, [memoryview(buf)], 0)
            assert got == 4096 and buf == b"x" * 4096 and not ring.pending
            n.cancel_scope.cancel()
    finally:
        os.close(fd)


async def test_a_cancelled_reaper_drains_what_is_in_flight_then_refuses_work(ring, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"y" * 65536)
    fd = os.open(path, os.O_RDONLY)
    bufs = [bytearray(65536) for _ in range(4)]
    results = []
    try:
        async with trio.open_nursery() as n:
            n.start_soon(ring.reaper, lambda: False)

            async def read(b):
                results.append(await ring.preadv(fd, [memoryview(b)], 0))

            for b in bufs:
                n.start_soon(read, b)
            with trio.fail_after(5):
                while len(ring.pending) < 4:
                    await trio.sleep(0)
            n.cancel_scope.cancel()  # reaper and readers cancelled with 4 operations in flight
        assert results == [65536] * 4 and all(b == b"y" * 65536 for b in bufs)
        assert not ring.pending and not ring.accepting
        with pytest.raises(trio.ClosedResourceError):
            await ring.preadv(fd, [memoryview(bufs[0])], 0)
    finally:
        os.close(fd)
