"""A worker started from a hand-over (its `init` with `restore`), in process: a snapshot
it understands continues the VMM's session; one it cannot understand is refused with a
log line, the VMM is told by its socket closing and the function starts clean."""

from __future__ import annotations

import os
import socket
import struct

import attrs
import pytest
import structlog
import trio

from zpcid import snapshot as S
from zpcid.devices import memory as Mem
from zpcid.service import config as cfg
from zpcid.service.channel import Channel
from zpcid.service.worker import Worker
from zpcid.vfio_user.memfd import Memfd
from zpcid.vfio_user.server import FunctionServer, bind_unix
from zpcid.vmm import client as vclient
from helpers import prepare_vmm


def _function_config(sock_dir: str) -> cfg.FunctionConfig:
    text = f"""[daemon]
runtime-dir = "{sock_dir}/run"

[[function]]
type = "memory"
fid = 1
uid = 1
name = "f1"
ram-size = 65536
"""
    return cfg.parse_text(text, "test.toml").functions[0]


async def _serve(fc, listener, nursery) -> tuple[FunctionServer, trio.CancelScope]:
    """Serve ``fc`` in this process (the worker that hands over)."""
    fn = fc.create()
    server = FunctionServer(fn, fc.socket, listener=listener)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await server.serve(task_status=task_status)

    await nursery.start(run)
    return server, scope


async def _worker_from(fc, listener, doc, fds, nursery, standby: bool = False):
    """A worker that takes over: ``init`` with the state, or (``standby``, as a live restart
    pre-starts it) ``init`` to build the function first, then ``start`` with the state.
    Returns our end of its channel and its own (to close: not left to the collector)."""
    ours, theirs = socket.socketpair()
    wch = Channel(theirs)
    nursery.start_soon(Worker(wch).run)
    ch = Channel(ours)
    sent = [os.dup(listener.fileno()), *fds]
    args = {"function": attrs.asdict(fc), "socket_mode": 0o600}
    if standby:
        await ch.send({"id": 1, "op": "init", "args": args | {"standby": True}})
        reply, _ = await ch.recv()
        assert reply.get("ok") and reply["id"] == 1, reply
        await ch.send({"id": 2, "op": "start", "args": {"restore": doc}}, sent)
    else:
        await ch.send({"id": 1, "op": "init", "args": args | {"restore": doc}}, sent)
    for fd in sent:  # the worker has its own copies now, as from the supervisor
        os.close(fd)
    reply, _ = await ch.recv()
    assert reply.get("ok"), reply
    return ch, wch


@pytest.mark.parametrize("standby", [False, True], ids=["init", "standby-start"])
async def test_restore_continues_and_refused_snapshot_closes_the_vmm(sock_dir, standby):
    fc = _function_config(sock_dir)
    os.makedirs(os.path.dirname(fc.socket), exist_ok=True)
    listener = bind_unix(fc.socket)
    mem = Memfd(1 << 20)
    try:
        for refuse in (False, True):
            async with trio.open_nursery() as nursery:
                server, scope = await _serve(fc, listener, nursery)
                async with vclient.connect(fc.socket) as c:
                    fds = await prepare_vmm(c, mem)
                    await c.region_write(4, Mem.REG_SCRATCH, struct.pack("<I", 0x77))
                    assert await server.quiesce()
                    doc, snap_fds = S.encode(await server.handover())
                    snap_fds = [os.dup(fd) for fd in snap_fds]  # what the channel carries
                    await server.abandon()
                    scope.cancel()
                    if refuse:  # a function snapshot from a newer zpcid
                        doc["fields"]["function"]["version"] = 99
                    with structlog.testing.capture_logs() as logs:
                        ch, wch = await _worker_from(fc, listener, doc, snap_fds, nursery, standby)
                    if refuse:
                        refused = [e for e in logs if e["event"] == "restore_refused"]
                        assert refused and "version 99" in refused[0]["error"]
                        with trio.fail_after(5):
                            await c._eof.wait()  # told at once, never left waiting
                    else:
                        assert await c.region_read(4, Mem.REG_SCRATCH, 4) == struct.pack("<I", 0x77)
                        await c.region_write(4, Mem.REG_DOORBELL, struct.pack("<I", 2))
                        assert await vclient.wait_eventfd(fds[2]) == 1
                    for fd in fds:
                        os.close(fd)
                if refuse:  # the function starts clean and takes the next VMM
                    async with vclient.connect(fc.socket) as c2:
                        assert await c2.region_read(4, Mem.REG_SCRATCH, 4) == bytes(4)
                nursery.cancel_scope.cancel()
            ch.close()
            wch.close()
    finally:
        listener.close()
        mem.close()


async def _refused(fc, requests) -> int:
    """Send ``requests`` ((msg, fds, expect_ok) each) to a fresh in-process worker; the
    last must be refused as a bad request. Returns the worker's exit code."""
    ours, theirs = socket.socketpair()
    ch, wch = Channel(ours), Channel(theirs)
    code = []
    async with trio.open_nursery() as nursery:
        async def run():
            code.append(await Worker(wch).run())

        nursery.start_soon(run)
        for msg, fds, ok in requests:
            await ch.send(msg, fds)
            for fd in fds:
                os.close(fd)
            reply, _ = await ch.recv()
            assert reply["id"] == msg["id"] and reply["ok"] is ok, reply
        assert reply["error"]["code"] == "bad-request"
    ch.close()
    wch.close()
    return code[0]


async def test_standby_worker_takes_only_start_with_the_listening_socket(sock_dir):
    """A pre-started worker serves nothing until `start`; a malformed request is refused
    and the worker exits (the supervisor's serving worker was never touched)."""
    fc = _function_config(sock_dir)
    standby = {"id": 1, "op": "init", "args": {"function": attrs.asdict(fc), "standby": True}}
    # descriptors with a standby init are refused
    assert await _refused(fc, [(standby, [os.open(os.devnull, os.O_RDONLY)], False)]) == 1
    # built, then anything but `start` (with the listening socket) ends it
    assert await _refused(fc, [(standby, [], True),
                               ({"id": 2, "op": "show", "args": {}}, [], False)]) == 1
    assert await _refused(fc, [(standby, [], True),
                               ({"id": 3, "op": "start", "args": {"restore": None}}, [], False)]) == 1
