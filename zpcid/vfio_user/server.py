"""The per-function Unix socket: one client at a time, reset between clients."""

from __future__ import annotations

import errno
import os
import socket
import stat

import attrs
import trio

from protocol.vfio_user.header import HEADER_SIZE, Header, error_reply
from zpcid import log
from zpcid.snapshot import Snapshot, SnapshotError
from zpcid.vfio_user.endpoint import Endpoint, EndpointSnapshot
from zpcid.vfio_user.transport import SocketTransport, close_fds

REFUSE_TIMEOUT = 2.0
HANDOVER_TIMEOUT = 0.5
# Connections beyond the attached one that are answered EBUSY at the same time;
# more are closed at once (a flood must not hold descriptors).
MAX_PENDING_REFUSALS = 8
# accept() failing for lack of resources (EMFILE, ENFILE, ...): wait and retry,
# the listener stays.
ACCEPT_BACKOFF = (0.01, 1.0)
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


async def accept(sock, log) -> trio.socket.SocketType:
    """``sock.accept()``, backing off (and logging once per streak) while the process
    or system is out of descriptors or memory."""
    delay = ACCEPT_BACKOFF[0]
    while True:
        try:
            conn, _ = await sock.accept()
            return conn
        except OSError as exc:
            if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                raise
            if delay == ACCEPT_BACKOFF[0]:
                log.warning("accept_failed", error=errno.errorcode.get(exc.errno, str(exc.errno)),
                            action="retrying")
            await trio.sleep(delay)
            delay = min(delay * 2, ACCEPT_BACKOFF[1])


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

    def __init__(self, function, path: str, *, mode: int = 0o600,
                 listener: trio.socket.SocketType | None = None, on_attached=None,
                 resume: EndpointSnapshot | None = None):
        """``listener``: an already listening socket someone else owns (the supervisor
        keeps the path and the socket across worker restarts); ``on_attached(bool)`` is
        told of every attach and detach; ``resume``: continue that client's connection
        (live restart; the function has been restored from the same hand-over)."""
        self.function = function
        self.path = path
        self.mode = mode
        self.endpoint: Endpoint | None = None
        self.refused = 0
        self.log = log.get("zpcid.vfio_user.server", function=function.name)
        self._session_scope: trio.CancelScope | None = None
        self._detached = trio.Event()
        self._listener = listener
        self._owns_listener = listener is None
        self._on_attached = on_attached or (lambda attached: None)
        self._pending_refusals = 0
        self._resume = resume
        self._accept_scope: trio.CancelScope | None = None
        self._accepting = trio.Event()  # cleared while quiesced
        self._accepting.set()
        self._handed_over = False

    @property
    def attached(self) -> bool:
        return self.endpoint is not None

    async def wait_detached(self) -> None:
        """Return once no client is attached (the last one's teardown finished)."""
        while self.endpoint is not None:
            await self._detached.wait()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self._owns_listener:
            self._listener = bind_unix(self.path, self.mode)
        sock = self._listener
        self.log.info("listening", socket=self.path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                if self._resume is not None:
                    resume, self._resume = self._resume, None
                    self._start_session(socket.socket(fileno=int(resume.socket)), nursery, resume)
                while True:
                    await self._accepting.wait()
                    with trio.CancelScope() as self._accept_scope:
                        conn = await accept(sock, self.log)
                    if self._accept_scope.cancelled_caught:
                        continue  # quiesced before a client came
                    if self.endpoint is None:
                        self._start_session(conn, nursery)
                    elif self._pending_refusals >= MAX_PENDING_REFUSALS:
                        self.refused += 1
                        conn.close()  # a flood: no answer, no descriptor held
                    else:
                        nursery.start_soon(self._wait_or_refuse, conn, nursery)
        finally:
            if self._owns_listener:
                sock.close()
                try:
                    # After a hand-over the path is the next process's.
                    if not self._handed_over and stat.S_ISSOCK(os.lstat(self.path).st_mode):
                        os.unlink(self.path)
                except FileNotFoundError:
                    pass
            if self.endpoint is None:
                self._detached.set()

    def _start_session(self, conn, nursery, resume: EndpointSnapshot | None = None) -> None:
        endpoint = Endpoint(SocketTransport(conn), self.function, name=self.function.name,
                            max_dma_maps=self.function.dma.max_maps)
        if resume is not None:
            endpoint.restore(resume)
        self.endpoint = endpoint
        self._detached = trio.Event()
        nursery.start_soon(self._session, endpoint, resume is not None)

    async def _wait_or_refuse(self, conn, nursery) -> None:
        """A VMM that reconnects right after hanging up may beat the old session's
        teardown: give that a moment before answering EBUSY."""
        self._pending_refusals += 1
        try:
            with trio.move_on_after(HANDOVER_TIMEOUT):
                await self.wait_detached()
            if self.endpoint is None:
                self._start_session(conn, nursery)
            else:
                await self._refuse(conn)
        finally:
            self._pending_refusals -= 1

    async def _session(self, endpoint: Endpoint, resumed: bool = False) -> None:
        self.function.attach(endpoint, resumed=resumed)
        self.log.info("attach", socket=self.path, resumed=resumed)
        self._on_attached(True)
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
                if self._handed_over:
                    self.function.release()  # the next process serves this client now
                else:
                    self.function.detach()
            self.endpoint = None
            self._detached.set()
            self._on_attached(False)
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
        if not self.function.release_requested():
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

    # ------------------------------------------------------------------ live restart
    async def quiesce(self) -> bool:
        """Stop accepting, stop serving at a message boundary, let device work finish.

        Returns whether a client is (still) attached.  ``handover`` or
        ``resume`` follows.
        """
        self._accepting = trio.Event()
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        endpoint = self.endpoint
        attached = endpoint is not None and await endpoint.quiesce()
        await self.function.quiesce()
        return attached and self.endpoint is endpoint

    def resume(self) -> None:
        """Go on serving after ``quiesce`` (the hand-over was abandoned)."""
        self.function.resume()
        if self.endpoint is not None:
            self.endpoint.resume()
        self._accepting.set()

    async def handover(self) -> "SessionSnapshot":
        """Everything the next process needs to continue this function and its client
        (fds borrowed: pass them on, then ``abandon``)."""
        endpoint = self.endpoint
        esnap = await endpoint.snapshot() if endpoint is not None else None
        return SessionSnapshot(function=self.function.snapshot(), endpoint=esnap)

    def listener_fd(self) -> int:
        if self._listener is None:
            raise RuntimeError("not listening")
        return self._listener.fileno()

    async def abandon(self) -> None:
        """After a hand-over: stop without a word to the client and without resetting
        anything shared (the next process serves both now); returns once our copies
        are closed.  Cancel ``serve`` afterwards."""
        self._handed_over = True
        if self._session_scope is not None:
            self._session_scope.cancel()
        if self.endpoint is not None:
            await self._detached.wait()


@attrs.frozen
class SessionSnapshot(Snapshot):
    """A function and its attached client (``endpoint`` None when detached)."""

    KIND = "vfio_user.session"
    function: Snapshot
    endpoint: EndpointSnapshot | None
