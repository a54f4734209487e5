"""The control socket: newline-delimited JSON requests and responses (docs/control-protocol.md).

Each connection's peer credentials (SO_PEERCRED) are checked before any
request is read: root, the daemon's own user and members of the optional
admin group are allowed.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import struct
from typing import Any, Awaitable, Callable

import trio

from protocol import json_limits
from zpcid import log

# Requests are a few hundred bytes; 64 KiB keeps one request's parse well
# under the event loop's ~10 ms budget.
MAX_LINE = 64 << 10
MAX_DEPTH = 32  # requests are two levels deep; arguments add a few
MAX_CONNECTIONS = 32
# A connection that sends no complete request for this long is closed; one that
# does not take its response within SEND_TIMEOUT too.  When all slots are taken,
# the connection idle the longest makes room for a new one.
IDLE_TIMEOUT = 30.0
SEND_TIMEOUT = 10.0
PROTOCOL_VERSION = 1

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class CommandError(Exception):
    """A request failed; ``code`` is one of the documented error codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def peer_credentials(sock) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def peer_allowed(uid: int, gid: int, admin_gid: int | None) -> bool:
    if uid == 0 or uid == os.geteuid():
        return True
    if admin_gid is None:
        return False
    if gid == admin_gid:
        return True
    try:
        return admin_gid in os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except (KeyError, OSError):
        return False


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


class _Slot:
    """One served connection: how to end it, and since when it waits for a request."""

    __slots__ = ("scope", "idle_since")

    def __init__(self, now: float):
        self.scope = trio.CancelScope()
        self.idle_since: float | None = now  # None while a request is being handled


class ControlServer:
    """Accepts control connections and dispatches requests to ``handlers``."""

    def __init__(self, handlers: dict[str, Handler], admin_gid: Callable[[], int | None]):
        self.handlers = handlers
        self.admin_gid = admin_gid
        self.requests = 0
        self.refused = 0
        self.evicted = 0
        self.log = log.get("zpcid.service.control")
        self._slots: set[_Slot] = set()

    async def serve(self, listener: trio.socket.SocketType) -> None:
        await trio.serve_listeners(self._connection, [trio.SocketListener(listener)])

    async def _connection(self, conn: trio.SocketStream) -> None:
        async with conn:
            try:
                pid, uid, gid = peer_credentials(conn.socket)
            except OSError:
                return
            if not peer_allowed(uid, gid, self.admin_gid()):
                self.refused += 1
                self.log.warning("control_refused", peer_pid=pid, peer_uid=uid, peer_gid=gid)
                await self._send(conn, {"ok": False, "error": {
                    "code": "permission-denied",
                    "message": f"uid {uid} may not control this daemon (needs uid {os.geteuid()}, "
                               f"root or the admin group)"}})
                return
            if len(self._slots) >= MAX_CONNECTIONS and not self._evict_idle():
                await self._send(conn, {"ok": False, "error": {
                    "code": "busy", "message": "too many control connections, all busy"}})
                return
            slot = _Slot(trio.current_time())
            self._slots.add(slot)
            try:
                with slot.scope:
                    await self._requests(conn, slot)
            finally:
                self._slots.discard(slot)

    def _evict_idle(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        idle = [s for s in self._slots if s.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.idle_since)
        self._slots.discard(victim)
        victim.scope.cancel()
        self.evicted += 1
        self.log.warning("control_evicted", reason="connection slots full; closed the longest idle one",
                         idle_s=round(trio.current_time() - victim.idle_since, 3))
        return True

    async def _requests(self, conn, slot: _Slot) -> None:
        buf = b""
        while True:
            with trio.move_on_at(slot.idle_since + IDLE_TIMEOUT) as idle:
                while b"\n" not in buf:
                    if len(buf) > MAX_LINE:
                        await self._send(conn, {"ok": False, "error": {
                            "code": "bad-request", "message": f"request longer than {MAX_LINE} bytes"}})
                        return
                    try:
                        chunk = await conn.receive_some(65536)
                    except trio.BrokenResourceError:
                        return
                    if not chunk:
                        return
                    buf += chunk
            if idle.cancelled_caught:
                self.log.info("control_idle_timeout", idle_s=IDLE_TIMEOUT)
                await self._send(conn, {"ok": False, "error": {
                    "code": "timeout", "message": f"no complete request within {IDLE_TIMEOUT:g} s"}})
                return
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            slot.idle_since = None
            response = await self.handle_line(line)
            if not await self._send(conn, response):
                return
            slot.idle_since = trio.current_time()

    async def handle_line(self, line: bytes) -> dict[str, Any]:
        self.requests += 1
        try:
            req = json_limits.loads(line, max_size=MAX_LINE, max_depth=MAX_DEPTH)
        except json_limits.JsonLimitError as exc:
            return {"ok": False, "error": {"code": "bad-request", "message": str(exc)}}
        except ValueError as exc:  # also UnicodeDecodeError
            return {"ok": False, "error": {"code": "bad-request", "message": f"not JSON: {exc}"}}
        rid = req.get("id") if isinstance(req, dict) else None
        out: dict[str, Any] = {"id": rid} if rid is not None else {}
        if not isinstance(req, dict) or not isinstance(req.get("command"), str):
            return out | {"ok": False, "error": {
                "code": "bad-request", "message": "expected an object with a string 'command'"}}
        args = req.get("args", {})
        if not isinstance(args, dict):
            return out | {"ok": False, "error": {"code": "bad-request", "message": "'args' must be an object"}}
        command = req["command"]
        handler = self.handlers.get(command)
        if handler is None:
            return out | {"ok": False, "error": {
                "code": "unknown-command",
                "message": f"unknown command {command!r}; known: {', '.join(sorted(self.handlers))}"}}
        try:
            result = await handler(args)
        except CommandError as exc:
            self.log.info("control_command_failed", command=command, code=exc.code, error=exc.message)
            return out | {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:  # a handler bug must not take the daemon down
            self.log.exception("control_command_crashed", command=command)
            return out | {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}
        return out | {"ok": True, "result": result}

    async def _send(self, conn: trio.SocketStream, obj) -> bool:
        """False if the peer is gone or does not take the response within SEND_TIMEOUT."""
        with trio.move_on_after(SEND_TIMEOUT):
            try:
                await conn.send_all(encode(obj))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True
        self.log.info("control_send_timeout", timeout_s=SEND_TIMEOUT)
        return False
