"""Issue 12 row 8 (and row 6 on the control socket), in-process on trio's mock clock:
a VMM that trickles its VERSION or stops reading its replies, and idle control
connections, cannot hold a function or the control socket from the next client.
"""

from __future__ import annotations

import json
import os
import struct

import trio

from protocol.vfio_user import messages as M
from protocol.vfio_user.header import Command
from vfio_raw import message, memory_server, raw_connect
from zpcid.devices.memory import MAGIC, REG_MAGIC
from zpcid.service import control
from zpcid.vfio_user import endpoint
from zpcid.vfio_user.server import bind_unix
from zpcid.vmm import client as zclient

VERSION = message(1, Command.VERSION, struct.pack("<HH", 0, 0) + b"{}\0")


async def attach_and_read_magic(path: str) -> None:
    async with zclient.connect(path) as c:
        assert struct.unpack("<I", await c.region_read(4, REG_MAGIC, 4))[0] == MAGIC


async def test_trickled_version_is_dropped_and_the_next_vmm_attaches(sock_dir, autojump_clock):
    async with memory_server(sock_dir) as (fn, server):
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.connect(server.path)
        start = trio.current_time()
        sent = 0
        # One byte a second: VERSION never completes within the timeout.
        while sent < len(VERSION) - 1:
            try:
                await sock.send(VERSION[sent : sent + 1])
            except OSError:
                break
            sent += 1
            with trio.move_on_after(1.0):
                try:
                    if await sock.recv(1) == b"":
                        break
                except ConnectionResetError:
                    break
        dropped_after = trio.current_time() - start
        assert sent < len(VERSION)
        assert endpoint.NEGOTIATE_TIMEOUT <= dropped_after <= endpoint.NEGOTIATE_TIMEOUT + 2
        sock.close()
        await attach_and_read_magic(server.path)


async def test_vmm_that_never_reads_its_replies_is_dropped(sock_dir, autojump_clock):
    async with memory_server(sock_dir, ram_size=1 << 20) as (fn, server):
        async with raw_connect(server.path) as peer:
            # 1 MiB replies, never read: the daemon's sends stall on a full socket.
            req = M.RegionAccess(0, 0, 1 << 20).pack()
            for i in range(64):
                try:
                    await peer.send(message(10 + i, Command.REGION_READ, req))
                except OSError:
                    break
            start = trio.current_time()
            with trio.fail_after(endpoint.SEND_TIMEOUT + 60):  # mock clock: a generous bound
                while server.attached:
                    await trio.sleep(0.5)
            assert trio.current_time() - start <= endpoint.SEND_TIMEOUT + 2
        await attach_and_read_magic(server.path)


async def _control(sock_dir, nursery):
    srv = control.ControlServer({"ping": _ping}, lambda: None)
    path = os.path.join(sock_dir, "control.sock")
    nursery.start_soon(srv.serve, bind_unix(path))
    await trio.sleep(0.01)
    return srv, path


async def _ping(args):
    return "pong"


async def request(path: str, line: bytes) -> dict:
    async with await trio.open_unix_socket(path) as s:
        await s.send_all(line)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = await s.receive_some(65536)
            assert chunk, "control socket hung up without an answer"
            buf += chunk
        return json.loads(buf)


async def test_control_idle_connections_cannot_lock_out_an_admin(sock_dir, autojump_clock):
    async with trio.open_nursery() as nursery:
        srv, path = await _control(sock_dir, nursery)
        idle = [await trio.open_unix_socket(path) for _ in range(control.MAX_CONNECTIONS + 8)]
        await trio.sleep(1)
        # All slots held by connections that send nothing: the newcomer still gets served.
        with trio.fail_after(5):
            assert (await request(path, b'{"command":"ping"}\n'))["result"] == "pong"
        assert srv.evicted >= 1
        # The idle ones are closed by the idle timeout at the latest.
        start = trio.current_time()
        with trio.fail_after(control.IDLE_TIMEOUT + 60):
            for s in idle:
                while True:
                    try:
                        data = await s.receive_some(4096)
                    except trio.BrokenResourceError:
                        break
                    if not data:
                        break
                await s.aclose()
        assert trio.current_time() - start <= control.IDLE_TIMEOUT + 1
        nursery.cancel_scope.cancel()


async def test_control_deep_json_gets_a_clear_error(sock_dir):
    async with trio.open_nursery() as nursery:
        srv, path = await _control(sock_dir, nursery)
        deep = b'{"command":"ping","args":{"x":' + b"[" * 990 + b"]" * 990 + b"}}\n"
        reply = await request(path, deep)
        assert reply["ok"] is False and reply["error"]["code"] == "bad-request"
        assert "nested deeper than" in reply["error"]["message"]
        big = b'{"command":"ping","args":{"x":"' + b"a" * control.MAX_LINE + b'"}}\n'
        reply = await request(path, big)
        assert reply["error"]["code"] == "bad-request" and str(control.MAX_LINE) in reply["error"]["message"]
        assert (await request(path, b'{"command":"ping"}\n'))["result"] == "pong"
        nursery.cancel_scope.cancel()


async def test_version_with_deep_json_is_refused_and_the_function_stays(sock_dir):
    async with memory_server(sock_dir) as (fn, server):
        async with raw_connect(server.path, negotiate=False) as peer:
            doc = b'{"capabilities":' + b"[" * 990 + b"]" * 990 + b"}"
            await peer.send(message(1, Command.VERSION, struct.pack("<HH", 0, 0) + doc + b"\0"))
            reply = await peer.recv()
            assert reply.is_error
            await peer.expect_eof()
        await attach_and_read_magic(server.path)
