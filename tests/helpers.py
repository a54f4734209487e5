"""Shared test plumbing: serve a function on a real socket inside a trio test."""

import contextlib
import os

import trio

from zpcid.vfio_user.server import FunctionServer


@contextlib.asynccontextmanager
async def serving(function, sock_dir: str, name: str = "fn.sock"):
    path = os.path.join(sock_dir, name)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(FunctionServer(function, path).serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def open_fds() -> set[int]:
    return {int(x) for x in os.listdir("/proc/self/fd")}


def mapping_count(pattern: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(pattern in line for line in f)
