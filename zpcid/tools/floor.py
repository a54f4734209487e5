"""The floor under the message path: what the benchmark measures zpcid against.

* ``BlockingPeer``: a minimal vfio-user client on a plain blocking socket (no
  trio, no framing object), so round trips measure the server, not the client.
* Responders, each in a process of its own like the daemon: a raw echo (no
  protocol at all), and two minimal vfio-user servers that answer VERSION and
  REGION_READ only, one with a blocking recv/send loop, one waiting through
  ``trio.lowlevel.wait_readable`` as any trio server must.
* ``cpu_seconds(pid)``: CPU time of a process and its descendants from
  ``/proc/*/schedstat`` (nanoseconds), so server CPU per message does not
  depend on the client or on wake-up latency.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import subprocess
import sys
import time

HEADER = struct.Struct("<HHIII")
HDR = HEADER.size
REGION_HEAD = struct.Struct("<QII")
REPLY = 0x1
VERSION, DMA_MAP, DMA_UNMAP, REGION_READ, REGION_WRITE = 1, 2, 3, 9, 10
# The smallest VERSION reply QEMU accepts: major 0, minor 0, caps, NUL.
_VERSION_REPLY = struct.pack("<HH", 0, 0) + (
    b'{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,'
    b'"max_dma_maps":65535}}\0')


# ---------------------------------------------------------------- CPU time
def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a supervisor and its worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """On-CPU time of ``pid``'s process tree, all threads, in seconds."""
    total = 0
    for p in _tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total / 1e9


# ---------------------------------------------------------------- blocking client
class BlockingPeer:
    """One vfio-user connection driven with blocking calls; one request at a time."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(True)
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._id = 0

    @classmethod
    def connect(cls, path: str) -> "BlockingPeer":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s)

    def call(self, cmd: int, payload: bytes, fds: tuple[int, ...] = ()) -> memoryview:
        """Send one command, return its reply's payload (valid until the next call)."""
        self._id = (self._id + 1) & 0xFFFF
        msg = HEADER.pack(self._id, cmd, HDR + len(payload), 0, 0) + payload
        if fds:
            sent = self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            self.sock.sendall(msg[sent:])
        else:
            self.sock.sendall(msg)
        got = self._recv_exact(0, HDR)
        msg_id, rcmd, size, flags, err = HEADER.unpack_from(self._buf)
        if msg_id != self._id or rcmd != cmd or not flags & REPLY:
            raise RuntimeError(f"unexpected message {msg_id}/{rcmd}/{flags:#x} for {self._id}/{cmd}")
        if err:
            raise OSError(err, f"command {cmd} failed")
        got = self._recv_exact(HDR, size)
        return self._view[HDR:got]

    def _recv_exact(self, have: int, want: int) -> int:
        while have < want:
            n = self.sock.recv_into(self._view[have:want])
            if not n:
                raise EOFError("server closed the connection")
            have += n
        return have

    def negotiate(self) -> None:
        self.call(VERSION, struct.pack("<HH", 0, 0) + b'{"capabilities":{"max_msg_fds":0}}\0')

    def close(self) -> None:
        self.sock.close()


def region_read(region: int, offset: int, count: int) -> bytes:
    return REGION_HEAD.pack(offset, region, count)


def region_write(region: int, offset: int, data: bytes) -> bytes:
    return REGION_HEAD.pack(offset, region, len(data)) + data


def round_trips(peer: BlockingPeer, cmd: int, payload: bytes, n: int) -> float:
    """Seconds per round trip over ``n`` sequential calls."""
    call = peer.call
    t = time.perf_counter()
    for _ in range(n):
        call(cmd, payload)
    return (time.perf_counter() - t) / n


# ---------------------------------------------------------------- responders
def _echo(conn: socket.socket) -> None:
    """Raw AF_UNIX echo: each request straight back with the reply bit set, nothing parsed.

    One ``recv`` per request holds: the client sends one small message and waits.
    """
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if not n:
            return
        buf[8] |= REPLY  # flags, first byte: the client checks it is a reply
        conn.sendall(view[:n])


def _answer(buf: bytearray, size: int) -> bytes:
    """Parse one message in ``buf[:size]`` and build its reply: VERSION or REGION_READ."""
    msg_id, cmd, _, flags, _ = HEADER.unpack_from(buf)
    if cmd == VERSION:
        return HEADER.pack(msg_id, cmd, HDR + len(_VERSION_REPLY), REPLY, 0) + _VERSION_REPLY
    if cmd == REGION_READ and size == HDR + 16:
        offset, region, count = REGION_HEAD.unpack_from(buf, HDR)
        return HEADER.pack(msg_id, cmd, HDR + 16 + count, REPLY, 0) + bytes(buf[HDR:HDR + 16]) + bytes(count)
    return HEADER.pack(msg_id, cmd, HDR, REPLY | 0x20, 38)  # ENOSYS


def _blocking(conn: socket.socket) -> None:
    """Minimal vfio-user server: blocking recv, parse, send."""
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    have = 0
    while True:
        while have < HDR or have < HEADER.unpack_from(buf)[2]:
            n = conn.recv_into(view[have:])
            if not n:
                return
            have += n
        size = HEADER.unpack_from(buf)[2]
        conn.sendall(_answer(buf, size))
        buf[: have - size] = buf[size:have]
        have -= size


def _trio(conn: socket.socket) -> None:
    """The same server, each wait for input through trio's scheduler."""
    import trio

    async def main() -> None:
        conn.setblocking(False)
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        have = 0
        while True:
            while have < HDR or have < HEADER.unpack_from(buf)[2]:
                try:
                    n = conn.recv_into(view[have:])
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(conn)
                    continue
                if not n:
                    return
                have += n
            size = HEADER.unpack_from(buf)[2]
            conn.send(_answer(buf, size))  # small replies: the socket buffer has room
            buf[: have - size] = buf[size:have]
            have -= size

    trio.run(main)


RESPONDERS = {"echo": _echo, "blocking": _blocking, "trio": _trio}


def serve_responder(kind: str, path: str) -> None:
    """Process entry: listen on ``path``, print READY, serve connections one by one."""
    fn = RESPONDERS[kind]
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    print("READY", flush=True)
    while True:
        conn, _ = lsock.accept()
        try:
            fn(conn)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()


class Responder:
    """A responder process; ``path`` to connect to, ``pid`` for its CPU time."""

    def __init__(self, kind: str, directory: str):
        self.kind = kind
        self.path = os.path.join(directory, f"{kind}.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "zpcid.tools.floor", kind, self.path],
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "READY":
            self.close()
            raise RuntimeError(f"{kind} responder did not start")
        self.pid = self.proc.pid

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()


if __name__ == "__main__":
    serve_responder(sys.argv[1], sys.argv[2])
