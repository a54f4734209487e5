"""An in-memory vfio-user Transport: two pipes of bounded capacity, descriptors duplicated
on the way as SCM_RIGHTS would.  A real implementation of the interface, for driving an
Endpoint without a socket (and with a send buffer as small as a test needs)."""

from __future__ import annotations

import collections
import os
from typing import Sequence

import trio


class Pipe:
    """One direction: chunks in flight, at most ``capacity`` bytes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.chunks: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.size = 0
        self.closed = False
        self.changed = trio.lowlevel.ParkingLot()

    def room(self) -> int:
        return self.capacity - self.size

    def put(self, data: bytes, fds: Sequence[int]) -> None:
        self.chunks.append((bytes(data), [os.dup(fd) for fd in fds]))
        self.size += len(data)
        self.changed.unpark_all()


class MemoryTransport:
    def __init__(self, inbound: Pipe, outbound: Pipe):
        self.inbound, self.outbound = inbound, outbound
        self._out: collections.deque[tuple[bytes, Sequence[int]]] = collections.deque()
        self._queued = 0

    def fileno(self) -> int:
        return -1  # no descriptor: a snapshot of this transport names none

    async def recv(self) -> tuple[bytes, list[int]]:
        pipe = self.inbound
        while not pipe.chunks:
            if pipe.closed:
                await trio.lowlevel.checkpoint()
                return b"", []
            await pipe.changed.park()
        data, fds = pipe.chunks.popleft()
        pipe.size -= len(data)
        pipe.changed.unpark_all()
        await trio.lowlevel.checkpoint()
        return data, fds

    @property
    def queued(self) -> int:
        return self._queued

    def send_nowait(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        if self.outbound.closed:
            raise BrokenPipeError("peer closed")
        self._out.append((bytes(data), list(fds)))
        self._queued += len(data)
        self.flush_nowait()
        return not self._out

    def flush_nowait(self) -> None:
        pipe = self.outbound
        while self._out and pipe.room() > 0:
            data, fds = self._out[0]
            n = min(len(data), pipe.room())
            pipe.put(data[:n], fds)
            self._queued -= n
            if n < len(data):
                self._out[0] = (data[n:], ())
            else:
                self._out.popleft()

    async def flush(self) -> None:
        while self._out:
            if self.outbound.closed:
                raise BrokenPipeError("peer closed")
            self.flush_nowait()
            if self._out:
                await self.outbound.changed.park()
        await trio.lowlevel.checkpoint()

    async def send(self, parts: Sequence[bytes], fds: Sequence[int] = ()) -> None:
        self.send_nowait(b"".join(parts), fds)
        await self.flush()

    async def aclose(self) -> None:
        for pipe in (self.inbound, self.outbound):
            pipe.closed = True
            pipe.changed.unpark_all()
        for _, fds in self.inbound.chunks:
            for fd in fds:
                os.close(fd)
        self.inbound.chunks.clear()
        await trio.lowlevel.checkpoint()


def transport_pair(capacity: int = 1 << 20) -> tuple[MemoryTransport, MemoryTransport]:
    a_to_b, b_to_a = Pipe(capacity), Pipe(capacity)
    return MemoryTransport(b_to_a, a_to_b), MemoryTransport(a_to_b, b_to_a)
