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

import structlog
import trio

from zpcid import log
from zpcid.service import config as cfg
from zpcid.service import metrics
from zpcid.service.channel import Channel, ChannelError, Closed, error, set_process_name
from zpcid.vfio_user.server import FunctionServer
from zpcid.vfio_user.transport import close_fds


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
        self._events_send, self._events_recv = trio.open_memory_channel(64)

    async def run(self) -> int:
        try:
            msg, fds = await self.channel.recv()
        except ChannelError:
            return 1
        if not await self._init(msg, fds):
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
                self.function.close()
        self.log.info("worker_exiting")
        return 0

    async def _init(self, msg, fds) -> bool:
        rid = msg.get("id")
        try:
            if msg.get("op") != "init" or len(fds) != 1:
                raise RequestError("bad-request", "expected 'init' with the listening socket")
            args = msg.get("args") or {}
            self.fc = fc = function_config(args["function"])
            structlog.contextvars.bind_contextvars(fid=fc.fid, uid=fc.uid)
            set_process_name(f"zpcid-fn{fc.fid:x}")
            try:
                self.function = fc.create()
            except cfg.ConfigError as exc:
                raise RequestError("invalid", str(exc)) from None
            listener = trio.socket.from_stdlib_socket(socket.socket(fileno=fds.pop()))
            self.server = FunctionServer(self.function, fc.socket, mode=args.get("socket_mode", 0o600),
                                         listener=listener, on_attached=self._attached)
            return True
        except RequestError as exc:
            close_fds(fds)
            await self.channel.send(error(rid, exc.code, exc.message))
            return False
        except (KeyError, TypeError, ValueError) as exc:
            close_fds(fds)
            await self.channel.send(error(rid, "bad-request", f"bad init: {exc}"))
            return False

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
        try:
            if handler is None:
                raise RequestError("not-supported", f"worker does not know op {op!r}")
            if not isinstance(args, dict):
                raise RequestError("bad-request", "'args' must be an object")
            reply = {"id": rid, "ok": True, "result": await handler(self, args)}
        except RequestError as exc:
            reply = error(rid, exc.code, exc.message)
        except Exception as exc:  # a bug in one request must not end the function
            self.log.exception("worker_request_crashed", op=op)
            reply = error(rid, "internal", f"{type(exc).__name__}: {exc}")
        await self.channel.send(reply)
        if op == "stop" and reply["ok"]:
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

    async def op_ping(self, args):
        return {"pid": os.getpid()}


HANDLERS = {"show": Worker.op_show, "sample": Worker.op_sample, "mappings": Worker.op_mappings,
            "events": Worker.op_events, "inject-error": Worker.op_inject_error,
            "reset": Worker.op_reset, "set": Worker.op_set, "release": Worker.op_release,
            "stop": Worker.op_stop, "ping": Worker.op_ping}
# `quiesce`, `snapshot`, `resume` (live restart, issue 13) answer not-supported until implemented.


def main(fd: int) -> int:
    """Entry in the freshly forked child: our channel is ``fd``, everything else is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = socket.socket(fileno=fd)

    async def amain() -> int:
        return await Worker(Channel(sock)).run()

    return trio.run(amain)
