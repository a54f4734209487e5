"""The zpcid service (the supervisor): configuration, the control socket, metrics, signals,
sd_notify, and every function's listening socket; each function runs in its own worker
process (``worker.py``, forked by ``zygote.py``; docs/isolation.md)."""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
import time
from typing import Any

import attrs
import trio

import zpcid
from protocol.zpci.formats import ZPCI_PEC_SYSTEM_ERROR
from zpcid.service import config as cfg
from zpcid import log
from zpcid.service import metrics
from zpcid.service import handover as ho
from zpcid.service import runtime
from zpcid.service.control import CommandError, ControlServer
from zpcid.service.sdnotify import Notifier
from zpcid.service.supervisor import WorkerHandle, Zygote
from zpcid.vfio_user.server import SocketInUse, bind_unix

# Injected when `zpcictl inject-error` gives no --pec: "system error", which a
# Linux guest answers with its generic error-recovery flow.
DEFAULT_INJECT_PEC = ZPCI_PEC_SYSTEM_ERROR
STATUS_INTERVAL = 1.0
STOP_GRACE = 5.0  # beyond a release timeout, for the worker's answer


class StartupError(Exception):
    """The daemon cannot start; the message is for the operator."""


class Managed:
    """A function the daemon serves: its configuration, listening socket and worker."""

    def __init__(self, config: cfg.FunctionConfig, listener, origin: str, daemon: "Daemon"):
        self.config = config
        self.listener = listener  # owned here: the socket outlives every worker
        self.origin = origin  # "file" or "runtime" (zpcictl add)
        self.worker = WorkerHandle(daemon.zygote, config.fid, config.uid, self.init_args, listener)
        self.socket_mode = daemon.config.daemon.socket_mode
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    @property
    def fid(self) -> int:
        return self.config.fid

    @property
    def state(self) -> str:
        return self.worker.state

    @property
    def attached(self) -> bool:
        return self.worker.attached

    def init_args(self) -> dict[str, Any]:
        return {"function": attrs.asdict(self.config), "socket_mode": self.socket_mode}

    def summary(self) -> dict[str, Any]:
        return {"fid": self.fid, "uid": self.config.uid, "name": self.config.name,
                "type": self.config.type, "state": self.state, "attached": self.attached,
                "socket": self.config.socket, "origin": self.origin,
                "pid": self.worker.pid if self.state == "serving" else None,
                "restarts": self.worker.restarts}


class Daemon:
    def __init__(self, config: cfg.Config, config_path: str | None = None,
                 notifier: Notifier | None = None):
        self.config = config  # the configuration file as last loaded successfully
        self.config_path = config_path  # None: the embedded default
        self.notifier = notifier or Notifier()
        self.functions: dict[int, Managed] = {}
        self.log = log.get("zpcid.service.daemon")
        self.started = time.time()
        self.reloads = 0
        self.reload_failures = 0
        self._lock = trio.Lock()  # serialises add/remove/set/reload
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._status = ""
        self.control = ControlServer(self._handlers(), lambda: self.config.daemon.admin_gid)
        self.registry = metrics.make_registry(
            lambda: [(m.fid, m.worker.sample, m.worker.restarts) for m in list(self.functions.values())])
        fmt, level = log.settings()
        self.zygote = Zygote(fmt, level)
        self.last_handover: dict[str, Any] | None = None  # what the last live restart/upgrade did
        self._exec_argv: list[str] | None = None  # set by `upgrade`: re-exec once stopped
        self._fdstore = False  # set on SIGTERM under systemd with an fd store: hand over into it
        self._handover: ho.Bundle | None = None
        self._retired: list[Zygote] = []  # zygotes of an upgraded-from supervisor, until their workers go

    # ------------------------------------------------------------------ main
    async def run(self) -> None:
        d = self.config.daemon
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            try:
                runtime.ensure_dir(d.runtime_dir)
                if d.admin_gid is not None and os.path.dirname(d.control_socket) == d.runtime_dir:
                    # The admin group must be able to reach the control socket.
                    os.chown(d.runtime_dir, -1, d.admin_gid)
                    os.chmod(d.runtime_dir, 0o750)
            except (OSError, runtime.RuntimeDirError) as exc:
                raise StartupError(f"runtime directory {d.runtime_dir}: {exc}") from None
            unlink: list[str] = []
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self.zygote.run)
                    nursery.start_soon(self._signals, signals)
                    control = self._bind(d.control_socket, d.control_mode, d.admin_gid, "control-socket")
                    unlink.append(d.control_socket)
                    nursery.start_soon(self._serve_listener, control, self.control.serve)
                    self.log.info("control_listening", socket=d.control_socket)
                    if d.metrics_listen:
                        listener = self._bind_metrics(d.metrics_listen)
                        if d.metrics_listen.startswith("unix:"):
                            unlink.append(d.metrics_listen[5:])
                        nursery.start_soon(self._serve_listener, listener,
                                           lambda s: metrics.serve_http(s, self.registry,
                                                                        self.refresh_samples))
                        self.log.info("metrics_listening", address=d.metrics_listen)
                    try:
                        taken = await self._start_handed_over()
                        for fc in self.config.functions:
                            if fc.fid in taken:
                                continue
                            try:
                                await self._start(fc, "file")
                            except cfg.ConfigError as exc:
                                raise StartupError(str(exc)) from None
                    except BaseException:
                        with trio.CancelScope(shield=True):
                            await self._stop_all()
                        raise
                    # Start-up made most of the objects this process will ever have; the
                    # collector need not scan them again (a full pass would stall a live
                    # restart that is pausing a function).
                    gc.collect()
                    gc.freeze()
                    self.notifier.notify("READY=1", f"STATUS={self.status()}", f"MAINPID={os.getpid()}")
                    self.log.info("ready", functions=len(self.functions), pid=os.getpid())
                    if self.notifier.watchdog_usec:
                        nursery.start_soon(self._watchdog)
                    nursery.start_soon(self._status_updater)
                    await self._stop.wait()
                    if self._fdstore and self._handover is None:
                        await self._hand_over_or_log()
                    if self._handover is not None:
                        self.notifier.notify("STOPPING=1", "STATUS=handing over to the next zpcid")
                        self.log.info("handing_over", functions=len(self.functions),
                                      carrier="re-exec" if self._exec_argv else "fd store")
                    else:
                        self.notifier.notify("STOPPING=1", "STATUS=stopping")
                        self.log.info("stopping", functions=len(self.functions))
                        await self._stop_all()
                    await self.zygote.aclose()
                    for z in self._retired:
                        await z.aclose()
                    nursery.cancel_scope.cancel()
            finally:
                if self._handover is None:
                    for path in unlink:
                        _unlink_socket(path)
                self.notifier.close()
        if self._handover is not None:
            self._finish_handover()  # returns only if it failed
        self.log.info("stopped")

    def _bind(self, path: str, mode: int, gid: int | None, key: str):
        try:
            sock = bind_unix(path, mode)
        except SocketInUse as exc:
            raise StartupError(f"[daemon] {key}: {exc}") from None
        except OSError as exc:
            raise StartupError(f"[daemon] {key}: cannot listen on {path}: {exc}") from None
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except OSError as exc:
                sock.close()
                _unlink_socket(path)
                raise StartupError(f"[daemon] {key}: cannot give {path} to gid {gid}: {exc}") from None
        return sock

    def _bind_metrics(self, address: str):
        if address.startswith("unix:"):
            gid = self.config.daemon.admin_gid
            return self._bind(address[5:], 0o600 if gid is None else 0o660, gid, "metrics-listen")
        host, _, port = address[4:].rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock._sock.bind((host, int(port)))  # noqa: SLF001 - numeric address, no resolution
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise StartupError(f"[daemon] metrics-listen: cannot listen on {host}:{port}: {exc}") from None
        return sock

    async def _serve_listener(self, sock, serve) -> None:
        with sock:
            await serve(sock)

    async def _signals(self, signals) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self._nursery.start_soon(self._reload_task)
            else:
                self.log.info("signal", signal=signal.Signals(signum).name)
                # Under systemd with an fd store (FileDescriptorStoreMax=, which sets
                # $FDSTORE) a stop may be a restart: keep the VMMs' connections in the
                # store; on a real stop systemd closes them and the VMMs see the end.
                if signum == signal.SIGTERM and self.notifier.enabled and _fdstore_max() > 0:
                    self._fdstore = True
                self._stop.set()

    async def _reload_task(self) -> None:
        try:
            await self.reload()
        except Exception:  # a reload bug must not take the running functions down
            self.reload_failures += 1
            self.log.exception("reload_crashed")

    async def _watchdog(self) -> None:
        # Pinging from a task proves the event loop (not just the process) is alive.
        interval = self.notifier.watchdog_usec / 2e6
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _status_updater(self) -> None:
        while True:
            status = self.status()
            if status != self._status:
                self._status = status
                self.notifier.notify(f"STATUS={status}")
            await trio.sleep(STATUS_INTERVAL)

    def status(self) -> str:
        attached = sum(m.attached for m in self.functions.values())
        return f"serving {len(self.functions)} functions, {attached} attached"

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ functions
    async def _start(self, fc: cfg.FunctionConfig, origin: str, listener=None,
                     restore: tuple[dict, list[int]] | None = None,
                     adopt: tuple[dict, int, Zygote] | None = None) -> Managed:
        """Listen on the function's socket and start its worker; ConfigError if either fails.

        ``listener``: the socket of the function this one replaces (same path), kept open
        so a VMM never finds the path missing. ``restore``: the state to start from;
        ``adopt``: instead of starting a worker, take over the running one an upgrade
        kept alive (its entry, channel fd and the retired zygote that forked it).
        """
        d = self.config.daemon
        ids = {"fid": fc.fid, "uid": fc.uid}
        if listener is None:
            try:
                listener = bind_unix(fc.socket, d.socket_mode)
            except (SocketInUse, OSError) as exc:
                raise cfg.ConfigError(f"{fc.source}: {fc.where} key 'socket': {exc}") from None
            if d.socket_gid is not None:
                try:
                    os.chown(fc.socket, -1, d.socket_gid)
                except OSError as exc:
                    self.log.warning("socket_chown_failed", socket=fc.socket, error=str(exc), **ids)
        m = Managed(fc, listener, origin, self)
        m.worker.restore = restore
        if adopt is not None:
            entry, fd, zygote = adopt
            m.worker.adopt_process(int(entry["pid"]), fd, int(entry.get("next_id", 0)),
                                   bool(entry.get("attached")), zygote)
        try:
            await self._nursery.start(self._run_function, m)
        except CommandError as exc:
            self._close_listener(m)
            raise cfg.ConfigError(exc.message) from None
        self.log.info("function_started", name=fc.name, type=fc.type, socket=fc.socket,
                      origin=origin, pid=m.worker.pid, **ids)
        return m

    async def _run_function(self, m: Managed, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            with m.scope:
                await m.worker.run(task_status=_Status(lambda value=None: self._serving(m, task_status)))
        finally:
            if self.functions.get(m.fid) is m:
                del self.functions[m.fid]
            m.done.set()

    def _serving(self, m: Managed, task_status) -> None:
        self.functions[m.fid] = m
        task_status.started(m)

    def _close_listener(self, m: Managed) -> None:
        m.listener.close()
        _unlink_socket(m.config.socket)

    async def _stop_function(self, m: Managed, timeout: float, force: bool = False,
                             keep_listener: bool = False) -> dict[str, Any]:
        """Remove a function; an attached VMM gets the REQ IRQ and ``timeout`` seconds."""
        was_attached, released = m.attached, True
        try:
            result = await m.worker.call("release", {"timeout": timeout, "force": force},
                                         timeout=timeout + STOP_GRACE)
            if isinstance(result, dict):  # whatever a broken worker answers, it is stopped below
                was_attached = bool(result.get("was_attached", was_attached))
                released = bool(result.get("released", released))
        except CommandError as exc:
            self.log.warning("release_failed", fid=m.fid, uid=m.config.uid, error=exc.message)
        await m.worker.stop()
        m.scope.cancel()
        await m.done.wait()
        if self.functions.get(m.fid) is m:
            del self.functions[m.fid]
        if not keep_listener:
            self._close_listener(m)
        self.log.info("function_stopped", fid=m.fid, uid=m.config.uid)
        return {"fid": m.fid, "was_attached": was_attached, "released": released,
                "forced": was_attached and not released}

    async def _stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for m in list(self.functions.values()):
                nursery.start_soon(self._stop_function, m, 0, True)

    async def refresh_samples(self) -> None:
        """Every worker's metrics sample, asked in parallel (a silent worker keeps its last)."""
        async with trio.open_nursery() as nursery:
            for m in list(self.functions.values()):
                nursery.start_soon(m.worker.refresh_sample)

    def _get(self, args: dict[str, Any]) -> Managed:
        fid = args.get("fid")
        if isinstance(fid, str):
            try:
                fid = int(fid, 0)
            except ValueError:
                raise CommandError("bad-request", f"fid {fid!r} is not a number") from None
        if not isinstance(fid, int) or isinstance(fid, bool):
            raise CommandError("bad-request", "expected an integer 'fid'")
        m = self.functions.get(fid)
        if m is None:
            raise CommandError("not-found", f"no function with fid {fid:#x}")
        return m

    # ------------------------------------------------------------------ reload
    async def reload(self) -> bool:
        """Re-read the file; apply only changed entries; keep the old config on any error."""
        async with self._lock:
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            self.log.info("reload_requested", config=self.config_path or "<embedded default>")
            try:
                applied = await self._reload()
            except cfg.ConfigError as exc:
                self.reload_failures += 1
                self.log.error("reload_rejected", error=str(exc))
                self.notifier.notify("READY=1", f"STATUS=reload rejected, old configuration kept: {exc}")
                self._status = ""
                return False
            self.reloads += 1
            self.log.info("reload_done", **applied)
            self.notifier.notify("READY=1", f"STATUS={self.status()}")
            self._status = ""
            return True

    async def _reload(self) -> dict[str, Any]:
        new = cfg.load(self.config_path) if self.config_path else cfg.load_default()
        old_file, new_file = self.config.by_fid(), new.by_fid()
        stop: set[int] = set()
        start: list[cfg.FunctionConfig] = []
        for fid, fc in old_file.items():
            if fid not in new_file and fid in self.functions and self.functions[fid].origin == "file":
                stop.add(fid)
        for fid, fc in new_file.items():
            if old_file.get(fid) == fc:
                continue  # untouched: an attached VMM keeps its session
            if fid in self.functions:
                stop.add(fid)
            start.append(fc)
        keep = [m.config for fid, m in self.functions.items() if fid not in stop]
        cfg.check_unique(keep + start, new.source)
        self._check_daemon_change(new.daemon)
        for fc in start:
            # Built (and released) here so a bad entry refuses the whole file before anything stops.
            fc.create().close()
        timeout = new.daemon.release_timeout
        kept: dict[int, Any] = {}  # fid -> listening socket handed to the replacement
        new_sockets = {fc.fid: fc.socket for fc in start}
        for fid in sorted(stop):
            m = self.functions[fid]
            keep = new_sockets.get(fid) == m.config.socket
            await self._stop_function(m, timeout, keep_listener=keep)
            if keep:
                kept[fid] = m.listener
        self.config = attrs.evolve(new, daemon=attrs.evolve(
            new.daemon, runtime_dir=self.config.daemon.runtime_dir,
            control_socket=self.config.daemon.control_socket,
            metrics_listen=self.config.daemon.metrics_listen,
            log_format=self.config.daemon.log_format, log_level=self.config.daemon.log_level,
            admin_gid=self.config.daemon.admin_gid, control_mode=self.config.daemon.control_mode))
        failed = []
        for fc in start:
            try:
                await self._start(fc, "file", kept.pop(fc.fid, None))
            except cfg.ConfigError as exc:
                failed.append(fc.fid)
                self.log.error("function_start_failed", error=str(exc), fid=fc.fid)
        return {"stopped": sorted(stop), "started": [f.fid for f in start], "failed": failed}

    def _check_daemon_change(self, new: cfg.DaemonConfig) -> None:
        old = self.config.daemon
        # Loggers bind their configuration when created, so log settings also wait for a restart.
        for key, attr in (("runtime-dir", "runtime_dir"), ("control-socket", "control_socket"),
                          ("metrics-listen", "metrics_listen"), ("log-format", "log_format"),
                          ("log-level", "log_level"), ("admin-group", "admin_gid"),
                          ("control-mode", "control_mode")):
            if getattr(old, attr) != getattr(new, attr):
                self.log.warning("restart_needed", key=key, running=getattr(old, attr),
                                 configured=getattr(new, attr))
        if new.runtime_dir != old.runtime_dir:
            try:
                runtime.ensure_dir(new.runtime_dir)
            except (OSError, runtime.RuntimeDirError) as exc:
                raise cfg.ConfigError(f"[daemon] runtime-dir: {exc}") from None

    # ------------------------------------------------------------------ control commands
    def _handlers(self):
        return {
            "list": self.cmd_list, "show": self.cmd_show, "mappings": self.cmd_mappings,
            "add": self.cmd_add, "remove": self.cmd_remove, "set": self.cmd_set,
            "reset": self.cmd_reset, "inject-error": self.cmd_inject_error,
            "clear-error": self.cmd_clear_error,
            "events": self.cmd_events, "stats": self.cmd_stats, "version": self.cmd_version,
            "metrics": self.cmd_metrics, "reload": self.cmd_reload,
            "restart": self.cmd_restart, "upgrade": self.cmd_upgrade,
        }

    async def cmd_restart(self, args):
        """Replace one function's worker by a new process (new code); its VMM stays attached."""
        m = self._get(args)
        async with self._lock:
            await self.zygote.renew()  # the new worker imports the code installed now
            result = await m.worker.live_restart()
        self.last_handover = {"kind": "restart", "fid": m.fid, **result}
        return {"fid": m.fid, **result}

    async def cmd_upgrade(self, args):
        """Hand every function (VMM connections included) to a new zpcid process."""
        binary = args.get("binary")
        if binary is not None and (not isinstance(binary, str) or not os.path.isabs(binary)
                                   or not os.access(binary, os.X_OK)):
            raise CommandError("invalid", f"binary {binary!r} is not an absolute path to an executable")
        if self._handover is not None:
            raise CommandError("busy", "a hand-over is already under way")
        argv = [binary, *sys.argv[1:]] if binary else [sys.executable, "-m", "zpcid.cli",
                                                      *sys.argv[1:]]
        await self._pass_workers()
        self._exec_argv = argv
        functions = len(self._handover.doc["functions"])
        self._nursery.start_soon(self._stop_after_reply)
        return {"pid": os.getpid(), "functions": functions, "exec": argv[0]}

    async def _stop_after_reply(self) -> None:
        await trio.sleep(0.01)  # lets the control server send the answer first
        self._stop.set()

    # ------------------------------------------------------------------ hand-over
    async def _pass_workers(self) -> None:
        """For an upgrade: leave every worker (and the zygote that forked them) running
        and serving its VMM; ``self._handover`` holds their channels and the listening
        sockets for the next process, which replaces the workers one by one with
        pre-started ones. No VMM waits for this process's exec."""
        async with self._lock:
            if self._handover is not None:
                raise CommandError("busy", "a hand-over is already under way")
            managed = sorted(self.functions.values(), key=lambda m: m.fid)
            bundle = ho.Bundle({"functions": [], "asked_at": time.monotonic()})
            for z in self._retired:  # (its workers, if any, lose only their exit report)
                await z.aclose()
            self._retired.clear()
            workers: list[int] = []
            for m in managed:
                entry = {"config": attrs.asdict(m.config), "origin": m.origin,
                         "listen": bundle.add_fd(m.listener.fileno()), "state": None, "fds": []}
                w = await m.worker.detach()  # None: restarting; the next process starts it clean
                if w is not None:
                    entry["worker"] = {"pid": w["pid"], "channel": bundle.add_fd(w["fd"]),
                                       "next_id": w["next_id"], "attached": w["attached"],
                                       "reported": w["zygote"] is self.zygote}
                    if w["zygote"] is self.zygote:
                        workers.append(w["pid"])
                bundle.doc["functions"].append(entry)
            z = await self.zygote.detach()
            if z is not None:
                bundle.doc["zygote"] = {"pid": z["pid"], "channel": bundle.add_fd(z["fd"]),
                                        "next_id": z["next_id"], "workers": workers}
            for m in managed:
                m.scope.cancel()
            self._handover = bundle
            self.log.info("handover_prepared", functions=len(managed), workers=len(workers),
                          fds=len(bundle.fds))

    async def _hand_over(self) -> None:
        """Quiesce and snapshot every worker, then let them go; ``self._handover`` holds
        everything the next process needs.  Nothing changes if a snapshot fails."""
        async with self._lock:
            t0 = time.monotonic()
            managed = sorted(self.functions.values(), key=lambda m: m.fid)
            taken: dict[int, tuple[dict, list[int]]] = {}
            failures: list[str] = []

            async def take(m: Managed) -> None:
                if m.worker.state != "serving":
                    return  # restarting: nothing to carry, the next process starts it clean
                try:
                    taken[m.fid] = await m.worker.quiesce_and_snapshot()
                except CommandError as exc:
                    failures.append(f"fid {m.fid:#x}: {exc.message}")

            async with trio.open_nursery() as n:
                for m in managed:
                    n.start_soon(take, m)
            if failures:
                async with trio.open_nursery() as n:
                    for m in managed:
                        if m.fid in taken:
                            n.start_soon(m.worker.resume)
                for _, fds in taken.values():
                    _close_all(fds)
                raise CommandError("busy", "hand-over abandoned, every function goes on: "
                                           + "; ".join(failures))
            bundle = ho.Bundle({"functions": [], "quiesced_at": t0})
            for m in managed:
                doc, fds = taken.get(m.fid, (None, []))
                bundle.doc["functions"].append({
                    "config": attrs.asdict(m.config), "origin": m.origin,
                    "listen": bundle.add_fd(m.listener.fileno()),
                    "state": doc, "fds": [bundle.add_fd(fd) for fd in fds]})
            # From here on the VMM connections live in the bundle only.
            async with trio.open_nursery() as n:
                for m in managed:
                    m.worker.stopping = True
                    n.start_soon(m.worker.abandon)
            for m in managed:
                m.scope.cancel()
            self._handover = bundle
            self.log.info("handover_prepared", functions=len(managed), fds=len(bundle.fds),
                          ms=round((time.monotonic() - t0) * 1e3, 2))

    async def _hand_over_or_log(self) -> None:
        try:
            await self._hand_over()
        except CommandError as exc:
            self.log.error("handover_failed", error=exc.message, action="stopping normally")

    def _finish_handover(self) -> None:
        """Out of trio: give the bundle to the next process (exec, or the fd store and exit)."""
        bundle = self._handover
        try:
            if self._exec_argv is not None:
                ho.exec_argv(self._exec_argv, bundle)  # does not return
            else:
                ho.fdstore_push(self.notifier.address, bundle)
                self.log.info("handed_over", carrier="fd store", fds=len(bundle.fds))
                return
        except ho.HandoverError as exc:
            self.log.error("handover_failed", error=str(exc),
                           action="VMM connections close; restart the daemon")
        bundle.close()

    async def _start_handed_over(self) -> set[int]:
        """Start the functions a previous zpcid handed over; returns their fids."""
        try:
            bundle = ho.receive(notify_address=self.notifier.address or None)
        except ho.HandoverError as exc:
            self.log.error("handover_unusable", error=str(exc), action="starting clean")
            return set()
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        if bundle is None:
            return set()
        taken: set[int] = set()
        entries = bundle.doc.get("functions", [])
        retired = self._retired_zygote(bundle)
        adopted: list[Managed] = []

        async def start(i: int, entry: dict) -> None:
            fds = [bundle.fds[j] for j in entry["fds"]]
            worker = entry.get("worker")
            if worker is not None:
                fds.append(bundle.fds[worker["channel"]])
            listener = trio.socket.from_stdlib_socket(socket.socket(fileno=bundle.fds[entry["listen"]]))
            try:
                fc = cfg.FunctionConfig(**entry["config"])
                adopt = None
                if worker is not None:  # the channel is the worker handle's from here on
                    adopt = (worker, fds.pop(), retired if worker.get("reported", True) else
                             Zygote.retired(*log.settings()))
                restore = (entry["state"], fds) if entry["state"] is not None else None
                m = await self._start(fc, entry["origin"], listener, restore=restore, adopt=adopt)
            except (cfg.ConfigError, TypeError, KeyError, ValueError) as exc:
                # Its VMM sees the connection close (these were the last copies; a running
                # worker exits when its channel closes).
                self.log.error("handover_function_failed", error=str(exc), entry=i)
                _close_all(fds)
                listener.close()
                return
            taken.add(fc.fid)
            if worker is not None:
                adopted.append(m)

        # In parallel: every VMM waits for the slowest start, not for the sum.
        async with trio.open_nursery() as nursery:
            for i, entry in enumerate(entries):
                nursery.start_soon(start, i, entry)
        if adopted or "asked_at" in bundle.doc:
            self._nursery.start_soon(self._upgrade_workers, adopted,
                                     float(bundle.doc.get("asked_at", time.monotonic())))
            return taken
        pause = time.monotonic() - float(bundle.doc.get("quiesced_at", time.monotonic()))
        self.last_handover = {"kind": "upgrade", "functions": len(taken),
                              "pause_ms": round(pause * 1e3, 3)}
        self.log.info("handover_restored", functions=len(taken), pause_ms=round(pause * 1e3, 2))
        return taken

    def _retired_zygote(self, bundle: ho.Bundle) -> Zygote:
        """The previous supervisor's zygote, still reaping the workers we adopt; without
        one (it had died), a stand-in that never reports an exit."""
        fmt, level = log.settings()
        z = bundle.doc.get("zygote")
        if z is None:
            return Zygote.retired(fmt, level)
        try:
            retired = Zygote.inherited(fmt, level, int(z["pid"]), bundle.fds[z["channel"]],
                                       int(z.get("next_id", 0)), [int(p) for p in z["workers"]])
        except (KeyError, TypeError, ValueError, IndexError, OSError) as exc:
            self.log.error("handover_zygote_unusable", error=str(exc))
            if isinstance(z, dict) and isinstance(z.get("channel"), int) \
                    and 0 <= z["channel"] < len(bundle.fds):
                _close_all([bundle.fds[z["channel"]]])
            return Zygote.retired(fmt, level)
        self._nursery.start_soon(retired.run)
        self._retired.append(retired)
        return retired

    async def _upgrade_workers(self, managed: list[Managed], asked: float) -> None:
        """After an upgrade's exec: replace each adopted worker (older code) by a new one.

        Every successor is started and has built its function before any function
        pauses; then one function at a time pauses only for its own quiesce, snapshot
        and restore. A successor that cannot start leaves the old worker serving."""
        async with self._lock:
            failed: dict[str, str] = {}
            successors: dict[int, Any] = {}
            try:
                await self.zygote.ready()
            except CommandError as exc:
                failed = {f"{m.fid:#x}": exc.message for m in managed}
            else:
                async def prepare(m: Managed) -> None:
                    try:
                        successors[m.fid] = await m.worker.prepare_successor()
                    except CommandError as exc:
                        failed[f"{m.fid:#x}"] = exc.message

                async with trio.open_nursery() as n:
                    for m in managed:
                        n.start_soon(prepare, m)
            pauses = []
            for m in managed:
                successor = successors.get(m.fid)
                if successor is None:
                    continue
                if self.functions.get(m.fid) is not m:
                    await m.worker.discard(successor)
                    continue
                try:
                    pauses.append((await m.worker.switch_to(successor, retire_now=False))["pause_ms"])
                except CommandError as exc:
                    failed[f"{m.fid:#x}"] = exc.message
            for m in managed:
                m.worker.retire_replaced()
            for fid, error in failed.items():
                self.log.error("worker_upgrade_failed", fid=fid, error=error,
                               action="the old worker goes on serving")
            self.last_handover = {"kind": "upgrade", "functions": len(managed),
                                  "replaced": len(pauses), "failed": failed,
                                  "pause_ms": max(pauses, default=0.0),
                                  "total_ms": round((time.monotonic() - asked) * 1e3, 3)}
            self.log.info("handover_restored", functions=len(managed), replaced=len(pauses),
                          pause_ms=self.last_handover["pause_ms"],
                          total_ms=self.last_handover["total_ms"])

    async def cmd_list(self, args):
        return [m.summary() for _, m in sorted(self.functions.items())]

    async def cmd_show(self, args):
        m = self._get(args)
        info = await m.worker.call("show")
        info |= {"state": m.state, "attached": info.get("attached", m.attached),
                 "socket": m.config.socket, "origin": m.origin, "config": m.config.entry(),
                 "pid": m.worker.pid, "restarts": m.worker.restarts}
        return info

    async def cmd_mappings(self, args):
        return await self._get(args).worker.call("mappings")

    async def cmd_events(self, args):
        return await self._get(args).worker.call("events", {"clear": bool(args.get("clear", False))})

    async def cmd_inject_error(self, args):
        m = self._get(args)
        pec = args.get("pec", DEFAULT_INJECT_PEC)
        if not isinstance(pec, int) or isinstance(pec, bool) or not 0 <= pec <= 0xFFFF:
            raise CommandError("invalid", "pec must be an integer in [0, 0xffff]")
        return await m.worker.call("inject-error", {"pec": pec})

    async def cmd_clear_error(self, args):
        return await self._get(args).worker.call("clear-error")

    async def cmd_reset(self, args):
        m = self._get(args)
        await m.worker.call("reset")
        return {"fid": m.fid, "reset": True}

    async def cmd_add(self, args):
        entry = args.get("function")
        if not isinstance(entry, dict):
            raise CommandError("bad-request", "expected 'function': an object of configuration keys")
        async with self._lock:
            try:
                fc = cfg.parse_function(entry, "add", self.config.daemon, where="function")
                if fc.fid in self.functions:
                    raise cfg.ConfigError(f"add: fid {fc.fid:#x} is already served")
                cfg.check_unique([m.config for m in self.functions.values()] + [fc], "add")
                m = await self._start(fc, "runtime")
            except cfg.ConfigError as exc:
                raise CommandError("invalid", str(exc)) from None
        return m.summary()

    async def cmd_remove(self, args):
        timeout = args.get("timeout", self.config.daemon.release_timeout)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= 3600:
            raise CommandError("invalid", "timeout must be seconds in [0, 3600]")
        async with self._lock:
            m = self._get(args)
            self.log.info("function_remove", fid=m.fid, attached=m.attached, timeout=timeout)
            return await self._stop_function(m, timeout, force=bool(args.get("force", False)))

    async def cmd_set(self, args):
        props = args.get("properties")
        if not isinstance(props, dict) or not props:
            raise CommandError("bad-request", "expected 'properties': an object of KEY: VALUE")
        async with self._lock:
            m = self._get(args)
            if m.attached:
                raise CommandError("busy", f"fid {m.fid:#x} has a VMM attached; properties can "
                                           "only change while it is detached")
            fields = {}
            for key, value in props.items():
                field = cfg.ZPCI_KEYS.get(key)
                if field is None or field == "fid":
                    raise CommandError("invalid", f"key '{key}': not a property that can be set; "
                                       f"settable: {', '.join(k for k in cfg.ZPCI_KEYS if k != 'fid')}")

                def err(msg, key=key):
                    raise CommandError("invalid", f"key '{key}': {msg}")
                fields[field] = cfg._check_prop(field, value, err)
            new = attrs.evolve(m.config, props=m.config.props | fields)
            try:
                cfg.check_unique([o.config for o in self.functions.values() if o is not m] + [new],
                                 "set")
            except cfg.ConfigError as exc:
                raise CommandError("invalid", str(exc)) from None
            await m.worker.call("set", {"fields": fields})
            m.config = new  # a restarted worker is built with the new properties
            return {"fid": m.fid, "set": {k.replace("_", "-"): v for k, v in fields.items()}}

    async def cmd_stats(self, args):
        await self.refresh_samples()
        totals: dict[str, int] = {}
        errors: dict[str, int] = {}
        for m in self.functions.values():
            sample = m.worker.sample or {"counters": {}, "errors": {}}
            for field in metrics.COUNTERS:
                totals[field] = totals.get(field, 0) + sample["counters"].get(field, 0)
            for kind, n in sample["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        return {"version": zpcid.__version__, "pid": os.getpid(),
                "uptime_seconds": round(time.time() - self.started, 3),
                "functions": len(self.functions),
                "attached": sum(m.attached for m in self.functions.values()),
                "worker_restarts": sum(m.worker.restarts for m in self.functions.values()),
                "last_handover": self.last_handover,
                "control_requests": self.control.requests, "control_refused": self.control.refused,
                "reloads": self.reloads, "reload_failures": self.reload_failures,
                "counters": totals, "errors": errors}

    async def cmd_version(self, args):
        return {"version": zpcid.__version__, "python": sys.version.split()[0],
                "trio": trio.__version__, "pid": os.getpid()}

    async def cmd_metrics(self, args):
        await self.refresh_samples()
        return {"text": metrics.render(self.registry)}

    async def cmd_reload(self, args):
        ok = await self.reload()
        if not ok:
            raise CommandError("invalid", "reload rejected; the old configuration keeps running (see the log)")
        return {"reloaded": True, "functions": len(self.functions)}


class _Status:
    """Wraps a task_status so the daemon learns when a server is listening."""

    def __init__(self, on_started):
        self._on_started = on_started

    def started(self, value=None):
        self._on_started(value)


def _unlink_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.get("zpcid.service.daemon").warning("unlink_failed", path=path, error=str(exc))


async def serve(config: cfg.Config, config_path: str | None) -> None:
    await Daemon(config, config_path).run()


def _fdstore_max() -> int:
    """systemd (v254+) sets $FDSTORE to FileDescriptorStoreMax= of the unit."""
    try:
        return int(os.environ.get("FDSTORE", "0"))
    except ValueError:
        return 0


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
