"""The per-function Unix socket: one client at a time, reset between clients."""

from __future__ import annotations

import errno
import os
import socket
import stat

import trio

from protocol.vfio_user.header import HEADER_SIZE, Header, error_reply
from protocol.vfio_user import consts as C
from zpcid import log
from zpcid.vfio_user.endpoint import Endpoint
from zpcid.vfio_user.transport import SocketTransport, close_fds

REFUSE_TIMEOUT = 2.0
HANDOVER_TIMEOUT = 0.5


class SocketInUse(Exception):
    """Another live process is serving on the socket path."""


def bind_unix(path: str, mode: int = 0o600, backlog: int = 16) -> trio.socket.SocketType:
    """Bind a listening socket, replacing a stale file but never a live daemon's socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a crash
        except OSError as exc:
            raise SocketInUse(f"{path}: cannot probe existing socket: {exc}") from None
        else:
            raise SocketInUse(f"{path} is served by a live process")
        finally:
            probe.close()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        # bind() on a trio socket is async only for name resolution; unix paths are local.
        sock._sock.bind(path)  # noqa: SLF001
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(backlog)
    return sock


class FunctionServer:
    """Listens on a function's socket and runs one ``Endpoint`` at a time."""

    def __init__(self, function, path: str, *, mode: int = 0o600):
        self.function = function
        self.path = path
        self.mode = mode
        self.endpoint: Endpoint | None = None
        self.refused = 0
        self.log = log.get("zpcid.vfio_user.server", function=function.name)
        self._session_scope: trio.CancelScope | None = None
        self._detached = trio.Event()
        self._listener: trio.socket.SocketType | None = None

    @property
    def attached(self) -> bool:
        return self.endpoint is not None

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._listener = sock = bind_unix(self.path, self.mode)
        self.log.info("listening", socket=self.path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    conn, _ = await sock.accept()
                    if self.endpoint is not None:
                        nursery.start_soon(self._wait_or_refuse, conn, nursery)
                    else:
                        self._start_session(conn, nursery)
        finally:
            sock.close()
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            if self.endpoint is None:
                self._detached.set()

    def _start_session(self, conn, nursery) -> None:
        self.endpoint = Endpoint(SocketTransport(conn), self.function, name=self.function.name,
                                 max_dma_maps=self.function.dma.max_maps)
        self._detached = trio.Event()
        nursery.start_soon(self._session, self.endpoint)

    async def _wait_or_refuse(self, conn, nursery) -> None:
        """A VMM that reconnects right after hanging up may beat the old session's
        teardown: give that a moment before answering EBUSY."""
        with trio.move_on_after(HANDOVER_TIMEOUT):
            while self.endpoint is not None:
                await self._detached.wait()
        if self.endpoint is None:
            self._start_session(conn, nursery)
        else:
            await self._refuse(conn)

    async def _session(self, endpoint: Endpoint) -> None:
        self.function.attach(endpoint)
        self.log.info("attach", socket=self.path)
        try:
            with trio.CancelScope() as scope:
                self._session_scope = scope
                async with trio.open_nursery() as tasks:
                    # Device work deferred past register accesses lives and dies
                    # with the session, before the DMA maps are torn down.
                    self.function.tasks = tasks
                    await endpoint.run()
                    tasks.cancel_scope.cancel()
        except Exception:
            # One client's session failing (a bug, not the client's input) must
            # not take down the socket for every later client.
            self.log.exception("session_failed")
        finally:
            self._session_scope = None
            self.function.tasks = None
            with trio.CancelScope(shield=True):
                self.function.detach()
            self.endpoint = None
            self._detached.set()
            self.log.info("detach", messages=endpoint.stats.messages, errors=endpoint.stats.errors)

    async def _refuse(self, conn: trio.socket.SocketType) -> None:
        """A second VMM: answer its first message with EBUSY and hang up."""
        self.refused += 1
        self.log.warning("attach_refused", reason="function already has a client")
        transport = SocketTransport(conn)
        with trio.move_on_after(REFUSE_TIMEOUT):
            data = b""
            while len(data) < HEADER_SIZE:
                chunk, fds = await transport.recv()
                close_fds(fds)
                if not chunk:
                    break
                data += chunk
            if len(data) >= HEADER_SIZE:
                h = Header.unpack(data)
                try:
                    await transport.send([error_reply(h.msg_id, h.cmd, errno.EBUSY)])
                except OSError:
                    pass
        await transport.aclose()

    async def request_release(self, timeout: float) -> bool:
        """Ask the client to let go (REQ IRQ); force the detach after ``timeout``.

        Returns True if the client left by itself.
        """
        if self.endpoint is None:
            return True
        # zPCI: the guest learns through a "deconfiguration requested" event;
        # vfio-user: the VMM through its REQ eventfd.
        self.function.zpci.availability(0x0303, "removal requested")
        if not self.function.irqs.signal(C.VFIO_PCI_REQ_IRQ_INDEX):
            timeout = 0  # the VMM installed no REQ eventfd: nobody would hear the request
        self.log.info("release_requested", timeout=timeout)
        with trio.move_on_after(timeout):
            await self._detached.wait()
            return True
        self.force_detach()
        await self._detached.wait()
        return False

    def force_detach(self) -> None:
        if self._session_scope is not None:
            self.log.warning("detach_forced")
            self._session_scope.cancel()
