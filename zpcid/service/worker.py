"""A worker process: one function, its own trio loop, driven by the supervisor.

Forked by the zygote with one descriptor, its end of the channel. The
supervisor's ``init`` brings the function's configuration and the listening
socket (which the supervisor keeps, so the function's socket outlives us);
the connected VMM socket, DMA maps and eventfds live only here, so when this
process dies the VMM sees end of file at once. Requests and replies are in
``docs/isolation.md``.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import attrs
import structlog
import trio

from zpcid import log
from zpcid import snapshot as snapshots
from zpcid.service import config as cfg
from zpcid.service import metrics
from zpcid.service.channel import Channel, ChannelError, Closed, error, set_process_name
from zpcid.vfio_user.server import FunctionServer, SessionSnapshot
from zpcid.vfio_user.transport import close_fds


QUIESCE_TIMEOUT = 10.0


@attrs.frozen
class WithFds:
    """A reply result that carries fds (sent with it, still ours afterwards)."""

    result: Any
    fds: list[int]


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def function_config(d: dict[str, Any]) -> cfg.FunctionConfig:
    """The FunctionConfig the supervisor sent (``attrs.asdict`` of its own)."""
    return cfg.FunctionConfig(**d)


class Worker:
    def __init__(self, channel: Channel):
        self.channel = channel
        self.log = log.get("zpcid.service.worker")
        self.function = None
        self.server: FunctionServer | None = None
        self.fc: cfg.FunctionConfig | None = None
        self._stop = trio.Event()
        self._handed_over = False  # after `abandon`: another process serves the function
        self._restore = None  # the SessionSnapshot `init` brought
        self._events_send, self._events_recv = trio.open_memory_channel(64)

    async def run(self) -> int:
        try:
            msg, fds = await self.channel.recv()
        except ChannelError:
            return 1
        if not await self._init(msg, fds):
            return 1
        if (msg.get("args") or {}).get("standby"):
            # Pre-started for a live restart: built, now wait for the function's state.
            await self.channel.send({"id": msg.get("id"), "ok": True, "result": {"pid": os.getpid()}})
            try:
                msg, fds = await self.channel.recv()
            except ChannelError:
                self.function.close()
                return 1
            if not await self._start(msg, fds):
                self.function.close()
                return 1
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self._serve_function)
                nursery.start_soon(self._forward_events)
                await self.channel.send({"id": msg.get("id"), "ok": True,
                                         "result": {"pid": os.getpid()}})
                nursery.start_soon(self._requests, nursery)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        except* Closed:
            pass  # the supervisor is gone: nothing is left to serve for
        finally:
            with trio.CancelScope(shield=True):
                if not self._handed_over:
                    self.function.close()
        self.log.info("worker_exiting")
        return 0

    async def _init(self, msg, fds) -> bool:
        """``init``: build the function from its configuration; unless ``standby``, also
        restore and listen (what ``start`` does for a pre-started worker)."""
        rid = msg.get("id")
        try:
            args = msg.get("args") or {}
            if msg.get("op") != "init" or not isinstance(args, dict):
                raise RequestError("bad-request", "expected 'init'")
            if bool(args.get("standby")) == bool(fds):
                raise RequestError("bad-request", "'init' comes with the listening socket, "
                                                  "or with 'standby' and no descriptors")
            self.fc = fc = function_config(args["function"])
            self._socket_mode = args.get("socket_mode", 0o600)
            structlog.contextvars.bind_contextvars(fid=fc.fid, uid=fc.uid)
            set_process_name(f"zpcid-fn{fc.fid:x}")
            try:
                self.function = fc.create()
            except cfg.ConfigError as exc:
                raise RequestError("invalid", str(exc)) from None
        except RequestError as exc:
            close_fds(fds)
            await self.channel.send(error(rid, exc.code, exc.message))
            return False
        except (KeyError, TypeError, ValueError) as exc:
            close_fds(fds)
            await self.channel.send(error(rid, "bad-request", f"bad init: {exc}"))
            return False
        return bool(args.get("standby")) or await self._start(msg, fds)

    async def _start(self, msg, fds) -> bool:
        """Restore the hand-over's state, if any, and take the listening socket: fds[0]
        is that socket, the rest the snapshot's (in its order)."""
        rid = msg.get("id")
        args = msg.get("args")
        if msg.get("op") not in ("init", "start") or not isinstance(args, dict) or not fds \
                or (len(fds) != 1 and args.get("restore") is None):
            close_fds(fds)
            await self.channel.send(error(rid, "bad-request", "expected 'start' with the listening "
                                                              "socket (and the snapshot's fds)"))
            return False
        listen, snap_fds = fds[0], fds[1:]
        resume = None
        if args.get("restore") is not None:
            resume = self._restore_function(self.fc, args["restore"], snap_fds)
        listener = trio.socket.from_stdlib_socket(socket.socket(fileno=listen))
        self.server = FunctionServer(self.function, self.fc.socket, mode=self._socket_mode,
                                     listener=listener, on_attached=self._attached, resume=resume)
        return True

    def _restore_function(self, fc, doc, fds):
        """Become the function of a hand-over; on a snapshot this build cannot take,
        say why, hang up on its VMM (it must not wait for answers that never come)
        and start clean."""
        try:
            snap = snapshots.decode(doc, fds)
            snapshots.expect(snap, SessionSnapshot)
        except snapshots.SnapshotError as exc:
            close_fds(fds)
            self.log.error("restore_refused", error=str(exc), action="vmm disconnected, function starts clean")
            return None
        try:
            self.function.restore(snap.function)
        except snapshots.SnapshotError as exc:
            if snap.endpoint is not None:
                snap.endpoint.close_fds()
            self.log.error("restore_refused", error=str(exc), action="vmm disconnected, function starts clean")
            self.function.close()
            self.function = fc.create()
            return None
        self.log.info("function_restored", attached=snap.endpoint is not None)
        return snap.endpoint

    async def _serve_function(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.server._listener:  # noqa: SLF001 - our duplicate of the supervisor's socket
            await self.server.serve(task_status=task_status)

    def _attached(self, attached: bool) -> None:
        try:
            self._events_send.send_nowait({"event": "attached" if attached else "detached"})
        except trio.WouldBlock:
            pass  # a burst of attach/detach: the supervisor asks `show` for the truth anyway

    async def _forward_events(self) -> None:
        async for event in self._events_recv:
            await self.channel.send(event)

    async def _requests(self, nursery) -> None:
        while True:
            try:
                msg, fds = await self.channel.recv()
            except Closed:
                self._stop.set()
                return
            close_fds(fds)  # no request of ours takes descriptors (snap's `restore` comes with init)
            nursery.start_soon(self._answer, msg)

    async def _answer(self, msg) -> None:
        rid = msg.get("id")
        op = msg.get("op")
        args = msg.get("args")
        handler = HANDLERS.get(op) if isinstance(op, str) else None
        reply_fds: list[int] = []
        try:
            if handler is None:
                raise RequestError("not-supported", f"worker does not know op {op!r}")
            if not isinstance(args, dict):
                raise RequestError("bad-request", "'args' must be an object")
            result = await handler(self, args)
            if isinstance(result, WithFds):
                result, reply_fds = result.result, result.fds
            reply = {"id": rid, "ok": True, "result": result}
        except RequestError as exc:
            reply = error(rid, exc.code, exc.message)
        except Exception as exc:  # a bug in one request must not end the function
            self.log.exception("worker_request_crashed", op=op)
            reply = error(rid, "internal", f"{type(exc).__name__}: {exc}")
        await self.channel.send(reply, reply_fds)
        if op in ("stop", "abandon") and reply["ok"]:
            self._stop.set()  # only now: the supervisor has its answer

    # ------------------------------------------------------------------ requests
    def _call(self, method: str, command: str):
        fn = getattr(self.function, method, None)
        if fn is None:
            raise RequestError("not-supported", f"'{command}' is not supported by this function "
                                                f"(fid {self.fc.fid:#x}, type {self.fc.type})")
        return fn

    async def op_show(self, args):
        return dict(self.function.describe()) | {"attached": self.server.attached,
                                                 "refused_clients": self.server.refused}

    async def op_sample(self, args):
        return metrics.sample(self.function, self.server.attached)

    async def op_mappings(self, args):
        return self._call("zpci_mappings", "mappings")()

    async def op_events(self, args):
        return self._call("zpci_events", "events")(clear=bool(args.get("clear", False)))

    async def op_inject_error(self, args):
        inject = self._call("inject_error", "inject-error")
        try:
            result = inject(args["pec"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RequestError("invalid", str(exc)) from None
        self.server.log.info("error_injected", pec=hex(args["pec"]))
        return result

    async def op_clear_error(self, args):
        clear = self._call("clear_error", "clear-error")
        try:
            result = clear()
        except ValueError as exc:
            raise RequestError("invalid", str(exc)) from None
        self.server.log.info("error_cleared")
        return result

    async def op_reset(self, args):
        await self.function.reset()
        self.server.log.info("reset_by_control")
        return {}

    async def op_set(self, args):
        setter = self._call("set_property", "set")
        if self.server.attached:
            raise RequestError("busy", f"fid {self.fc.fid:#x} has a VMM attached; properties can "
                                       "only change while it is detached")
        fields = args.get("fields") or {}
        for field, value in fields.items():
            try:
                setter(field, value)
            except RuntimeError as exc:  # attached meanwhile
                raise RequestError("busy", str(exc)) from None
            except (ValueError, TypeError, KeyError) as exc:
                text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise RequestError("invalid", f"key '{field.replace('_', '-')}': {text}") from None
        self.server.log.info("properties_set", **fields)
        return {}

    async def op_release(self, args):
        was_attached = self.server.attached
        released = True
        if was_attached:
            if args.get("force"):
                self.server.force_detach()
                released = False
            else:
                released = await self.server.request_release(float(args.get("timeout", 0)))
        return {"was_attached": was_attached, "released": released}

    async def op_stop(self, args):
        # Answered first (see _answer); leaving the nursery then detaches an attached VMM.
        return {}

    # ------------------------------------------------------------------ live restart
    async def op_quiesce(self, args):
        """Stop at a message boundary with device work done (bounded by ``timeout``)."""
        timeout = float(args.get("timeout", QUIESCE_TIMEOUT))
        with trio.move_on_after(timeout):
            attached = await self.server.quiesce()
            return {"quiesced": True, "attached": attached}
        self.server.resume()
        raise RequestError("busy", f"device work did not finish within {timeout:g} s")

    async def op_snapshot(self, args):
        """The session's snapshot as a document, its fds beside it (borrowed: ours stay
        open until `abandon` or `resume`)."""
        try:
            snap = await self.server.handover()
            doc, fds = snapshots.encode(snap)
        except snapshots.SnapshotError as exc:
            raise RequestError("busy", f"cannot snapshot: {exc}") from None
        return WithFds({"state": doc}, fds)

    async def op_handover(self, args):
        """``quiesce`` and ``snapshot`` in one request: a live restart's pause then waits
        for one round trip to this worker instead of two. Still quiesced afterwards (or
        resumed, if either step fails)."""
        await self.op_quiesce(args)
        try:
            return await self.op_snapshot(args)
        except RequestError:
            self.server.resume()
            raise

    async def op_resume(self, args):
        self.server.resume()
        return {}

    async def op_abandon(self, args):
        """The successor took over: close our copies, touch nothing shared, exit."""
        await self.server.abandon()
        self._handed_over = True
        return {}

    async def op_ping(self, args):
        return {"pid": os.getpid()}


HANDLERS = {"show": Worker.op_show, "sample": Worker.op_sample, "mappings": Worker.op_mappings,
            "events": Worker.op_events, "inject-error": Worker.op_inject_error,
            "clear-error": Worker.op_clear_error,
            "reset": Worker.op_reset, "set": Worker.op_set, "release": Worker.op_release,
            "stop": Worker.op_stop, "ping": Worker.op_ping, "quiesce": Worker.op_quiesce,
            "snapshot": Worker.op_snapshot, "handover": Worker.op_handover, "resume": Worker.op_resume,
            "abandon": Worker.op_abandon}


def main(fd: int) -> int:
    """Entry in the freshly forked child: our channel is ``fd``, everything else is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = socket.socket(fileno=fd)

    async def amain() -> int:
        return await Worker(Channel(sock)).run()

    return trio.run(amain)
