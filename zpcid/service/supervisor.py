"""The supervisor's side of the worker processes: the zygote handle and one handle per worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any

import attrs
import trio

from zpcid import log
from zpcid.service import metrics
from zpcid.service.channel import Channel, ChannelError, Closed, socketpair
from zpcid.service.control import CommandError
from zpcid.service.zygote import SINGLE_THREADED_ENV
from zpcid.vfio_user.transport import close_fds

RPC_TIMEOUT = 30.0  # a worker that does not answer a control request in this long is reported busy
INIT_TIMEOUT = 60.0  # building a function (e.g. a large RAM BAR) on a loaded machine
EXIT_REPORT_TIMEOUT = 5.0  # how long a dead worker's exit status may take to arrive from the zygote
STOP_TIMEOUT = 10.0
SAMPLE_TIMEOUT = 2.0  # per scrape; a worker slower than this contributes its last sample  # a worker asked to stop is killed after this long
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 0.05, 5.0, 10.0
QUIESCE_TIMEOUT = 10.0  # device work a live restart waits for before it gives up (and resumes)


def exit_reason(status: int | None) -> str:
    if status is None:
        return "unknown (no exit status)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by signal {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


class _Rpc:
    """Requests over a channel; one reader task resolves replies by id and passes events on."""

    def __init__(self, channel: Channel, on_event, next_id: int = 0):
        self.channel = channel
        self.on_event = on_event
        # A channel inherited through an upgrade may still bring replies to the previous
        # supervisor's requests: their ids must not be reused.
        self._next = next_id
        self._pending: dict[int, list] = {}
        self.closed = False

    async def call(self, op: str, args: dict[str, Any] | None = None, fds=(),
                   timeout: float = RPC_TIMEOUT) -> tuple[Any, list[int]]:
        if self.closed:
            raise Closed("channel closed")
        self._next += 1
        rid = self._next
        slot = [trio.Event(), None, []]
        self._pending[rid] = slot
        try:
            await self.channel.send({"id": rid, "op": op, "args": args or {}}, fds)
            with trio.move_on_after(timeout):
                await slot[0].wait()
            if not slot[0].is_set():
                raise CommandError("busy", f"no answer to '{op}' within {timeout:g} s")
        finally:
            self._pending.pop(rid, None)
        msg = slot[1]
        if msg is None:
            raise Closed("channel closed before the reply")
        if not msg.get("ok"):
            close_fds(slot[2])
            err = msg.get("error") or {}
            raise CommandError(str(err.get("code", "internal")), str(err.get("message", "failed")))
        return msg.get("result"), slot[2]

    @property
    def next_id(self) -> int:
        return self._next + 1

    async def read(self) -> None:
        """Until the peer closes (or cancelled: at a frame boundary); then every waiting call fails."""
        try:
            while True:
                msg, fds = await self.channel.recv()
                rid = msg.get("id")
                slot = self._pending.get(rid) if isinstance(rid, int) else None
                if slot is not None:
                    slot[1], slot[2] = msg, fds
                    slot[0].set()
                else:
                    close_fds(fds)
                    if "event" in msg:
                        self.on_event(msg)
        except ChannelError:
            pass
        finally:
            self.closed = True
            for slot in self._pending.values():
                slot[0].set()


class _Inherited:
    """A child this process inherited through ``execve`` (trio.Process cannot adopt one)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    async def wait(self) -> int:
        if self.returncode is None:
            await trio.lowlevel.wait_readable(self._pidfd)
            try:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = -1  # not ours to reap after all
            os.close(self._pidfd)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass


class Zygote:
    """The fork server process: started on first use and again whenever it has died.

    A *retired* zygote is one the previous supervisor (older code) handed over
    with workers still running (``zpcictl upgrade``): it forks nothing more,
    reports its workers' exits, and is told to exit once the last one has gone.
    """

    def __init__(self, log_format: str, log_level: str):
        self.log_format, self.log_level = log_format, log_level
        self.log = log.get("zpcid.service.supervisor")
        self._rpc: _Rpc | None = None
        self._proc: trio.Process | _Inherited | None = None
        self._lock = trio.Lock()
        self._exits: dict[int, int] = {}  # pid -> waitpid status, until collected
        self._exited = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._retiring: set[int] | None = None  # a retired zygote's workers still running
        self._watch_scope: trio.CancelScope | None = None
        self._unwatched = trio.Event()

    @classmethod
    def inherited(cls, log_format: str, log_level: str, pid: int, fd: int, next_id: int,
                  workers: list[int]) -> "Zygote":
        """The retired zygote of the previous supervisor: its channel came through exec."""
        z = cls(log_format, log_level)
        z._proc = _Inherited(pid)
        z._rpc = _Rpc(Channel(socket.socket(fileno=fd)), z._event, next_id)
        z._retiring = set(workers)
        return z

    @classmethod
    def retired(cls, log_format: str, log_level: str) -> "Zygote":
        """A stand-in for a zygote that is gone: it forks nothing and reports no exits."""
        z = cls(log_format, log_level)
        z._retiring = set()
        return z

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self._retiring is not None:
                self._start_watch()
                self._retire_if_done()
            else:
                # Started now rather than at the first spawn: its imports overlap the supervisor's
                # own start-up (binding sockets, restoring a hand-over) instead of following it.
                try:
                    async with self._lock:
                        await self._ensure()
                except OSError as exc:  # the first spawn tries again and reports it
                    self.log.error("zygote_start_failed", error=str(exc))
            await trio.sleep_forever()

    async def _ensure(self) -> _Rpc:
        if self._rpc is not None and not self._rpc.closed:
            return self._rpc
        if self._retiring is not None:
            raise CommandError("unavailable", "a retired zygote starts no workers")
        ours, theirs = socketpair()
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")}
        env |= SINGLE_THREADED_ENV
        try:
            self._proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "zpcid.service.zygote", "--fd", str(theirs.fileno()),
                 "--log-format", self.log_format, "--log-level", self.log_level],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._rpc = _Rpc(Channel(ours), self._event)
        self._start_watch()
        self.log.info("zygote_started", pid=self._proc.pid)
        return self._rpc

    def _start_watch(self) -> None:
        self._watch_scope, self._unwatched = trio.CancelScope(), trio.Event()
        self._nursery.start_soon(self._watch, self._rpc, self._proc, self._watch_scope, self._unwatched)

    async def _watch(self, rpc: _Rpc, proc, scope: trio.CancelScope, unwatched: trio.Event) -> None:
        with scope:
            await rpc.read()
        if scope.cancelled_caught:  # detached: the channel and the process go on elsewhere
            unwatched.set()
            return
        rpc.channel.close()
        with trio.move_on_after(EXIT_REPORT_TIMEOUT):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log_ = self.log.info if self._retiring is not None else self.log.warning
        log_("zygote_exited", pid=proc.pid, code=proc.returncode)
        self._exited.set()  # its workers' exit statuses will never come

    def _event(self, msg) -> None:
        if msg.get("event") == "exited" and isinstance(msg.get("pid"), int):
            self._exits[msg["pid"]] = int(msg.get("status", 0))
            if len(self._exits) > 4096:  # statuses nobody collected (never expected): bound them
                self._exits.pop(next(iter(self._exits)))
            self._exited.set()
            self._exited = trio.Event()
            if self._retiring is not None:
                self._retiring.discard(msg["pid"])
                self._retire_if_done()

    def _retire_if_done(self) -> None:
        if not self._retiring and self._rpc is not None:
            self._rpc.channel.close()  # it exits at end of file; _watch reaps it

    async def detach(self) -> dict[str, int] | None:
        """Stop talking to the zygote at a frame boundary and hand over its channel
        (fd now the caller's), pid and next request id; None if there is none."""
        async with self._lock:
            rpc, proc = self._rpc, self._proc
            if rpc is None or rpc.closed or self._retiring is not None:
                return None
            self._watch_scope.cancel()
            await self._unwatched.wait()
            self._rpc = self._proc = None
            return {"pid": proc.pid, "fd": rpc.channel.detach(), "next_id": rpc.next_id}

    async def ready(self) -> None:
        """Return once the zygote answers (its imports are done)."""
        async with self._lock:
            rpc = await self._ensure()
        try:
            await rpc.call("ready?", timeout=INIT_TIMEOUT)  # any answer means it is serving
        except CommandError:
            pass
        except Closed:
            raise CommandError("unavailable", "the zygote died at start") from None

    async def spawn(self, fid: int) -> tuple[int, Channel, _Rpc]:
        """A new worker process, our end of its channel, and the zygote (channel) that forked it."""
        async with self._lock:
            rpc = await self._ensure()
            ours, theirs = socketpair()
            try:
                result, _ = await rpc.call("spawn", {"fid": fid}, [theirs.fileno()])
            except Closed:
                ours.close()
                raise CommandError("unavailable", "the zygote died while starting a worker") from None
            finally:
                theirs.close()
            return int(result["pid"]), Channel(ours), rpc

    async def renew(self) -> None:
        """Replace the zygote by one that imports the code installed now; returns once it
        answers (so a live restart does not wait for the imports while its VMM waits)."""
        async with self._lock:
            if self._rpc is not None:
                self._rpc.channel.close()  # the old one exits at end of file
                self._rpc = None
        await self.ready()

    async def exit_status(self, pid: int, parent: _Rpc | None,
                          timeout: float = EXIT_REPORT_TIMEOUT) -> int | None:
        """The waitpid status the zygote ``parent`` reports for ``pid`` (None: it never will)."""
        with trio.move_on_after(timeout):
            while pid not in self._exits:
                if parent is None or parent.closed:
                    return None  # that zygote died: its orphans are reaped by init
                await self._exited.wait()
        return self._exits.pop(pid, None)

    async def aclose(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if self._rpc is not None:
            self._rpc.channel.close()  # the zygote exits on end of file
        if self._proc is not None:
            with trio.move_on_after(STOP_TIMEOUT):
                await self._proc.wait()
            if self._proc.returncode is None:
                self._proc.kill()
                if isinstance(self._proc, _Inherited):
                    await self._proc.wait()  # nobody else reaps it


@attrs.define(eq=False)
class _Process:
    """One worker process: its channel, pid (and pidfd) and the zygote that forked it."""

    pid: int
    rpc: _Rpc
    zygote: Zygote
    parent: _Rpc | None  # the zygote channel that reports this process's exit
    pidfd: int | None = None
    read_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    read_done: trio.Event = attrs.field(factory=trio.Event)  # the reader stopped (or detached)
    gone: trio.Event = attrs.field(factory=trio.Event)  # the channel ended: the process exits
    ended: trio.Event = attrs.field(factory=trio.Event)  # gone, or replaced by ``successor``
    successor: "_Process | None" = None
    attached: bool = False

    @classmethod
    def make(cls, pid: int, channel: Channel, zygote: Zygote, parent: _Rpc, on_event,
             next_id: int = 0) -> "_Process":
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = None  # already gone: the channel tells us at once
        proc = cls(pid, None, zygote, parent, pidfd)
        proc.rpc = _Rpc(channel, lambda msg: on_event(proc, msg), next_id)
        return proc

    async def read(self) -> None:
        try:
            with self.read_scope:
                await self.rpc.read()
        finally:
            self.read_done.set()
        if not self.read_scope.cancelled_caught:
            self.rpc.channel.close()
            self.gone.set()
            self.ended.set()

    def kill(self) -> None:
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except OSError:
                pass

    def close_pidfd(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    async def reap(self) -> int | None:
        """Once its channel has ended: the exit status (None: unknown); closes the pidfd."""
        try:
            await self.read_done.wait()
            return await self.zygote.exit_status(self.pid, self.parent)
        finally:
            self.close_pidfd()


@attrs.define(eq=False)
class WorkerHandle:
    """One function's worker as the supervisor sees it; restarts it when it dies.

    ``proc`` is the process serving now. A live restart pre-starts its successor
    (built, not yet serving), and only then pauses the function: quiesce, snapshot,
    ``start`` the successor with the snapshot, and let the old one go.
    """

    zygote: Zygote
    fid: int
    uid: int
    init_args: Any  # callable: () -> (args dict for `init`); the config may change between restarts
    listener: Any  # the listening socket (a trio socket) the supervisor owns
    pid: int | None = None
    state: str = "starting"
    restarts: int = 0
    sample: dict | None = None
    stopping: bool = False
    proc: _Process | None = None
    log: Any = attrs.field(factory=lambda: log.get("zpcid.service.supervisor"))
    _gone: trio.Event = attrs.field(factory=trio.Event)
    _nursery: trio.Nursery | None = None
    # The state the first incarnation starts from (document, fds we hold) ...
    restore: tuple[dict, list[int]] | None = None
    # ... or the running process it takes over (an upgrade kept it alive through exec).
    adopt: _Process | None = None
    _replaced: list[_Process] = attrs.field(factory=list)  # quiesced, waiting to be let go

    @property
    def attached(self) -> bool:
        return self.proc is not None and self.proc.attached

    @property
    def rpc(self) -> _Rpc | None:
        return self.proc.rpc if self.proc is not None else None

    def adopt_process(self, pid: int, fd: int, next_id: int, attached: bool, zygote: Zygote) -> None:
        """Take over a worker the previous supervisor left running (its channel ``fd``)."""
        channel = Channel(socket.socket(fileno=fd))
        self.adopt = _Process.make(pid, channel, zygote, zygote._rpc, self._event, next_id)
        self.adopt.attached = attached

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker running until cancelled or stopped; the first start's error propagates."""
        backoff = BACKOFF_FIRST
        first = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                proc, self.adopt = self.adopt, None
                if proc is not None:
                    nursery.start_soon(proc.read)
                while not self.stopping:
                    started = trio.current_time()
                    try:
                        if proc is None:
                            proc = await self._launch()
                    except (CommandError, ChannelError) as exc:
                        if first:
                            raise
                        self.state = "restarting"
                        self.log.error("worker_start_failed", fid=self.fid, uid=self.uid,
                                       error=str(getattr(exc, "message", exc)))
                    else:
                        self._serve(proc)
                        if first:
                            first = False
                            task_status.started(self)
                        while proc.successor is None and not proc.gone.is_set():
                            await proc.ended.wait()
                            if proc.successor is not None:
                                proc = proc.successor  # a live restart: it serves already
                        if self.stopping:
                            self.proc = None
                            await proc.reap()
                            break
                        await self._died(proc)
                        proc = None
                    if self.stopping:
                        break
                    if trio.current_time() - started > HEALTHY_AFTER:
                        backoff = BACKOFF_FIRST
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                nursery.cancel_scope.cancel()
        finally:
            for replaced in self._replaced:  # never let go: they must not resume
                replaced.kill()
                replaced.close_pidfd()
            self._replaced.clear()
            if self.proc is not None:
                self.proc.kill()
                self.proc.close_pidfd()
                self.proc = None
            self.drop_restore()
            self.state = "stopped"
            self._gone.set()

    async def _launch(self, standby: bool = False) -> _Process:
        """Start a worker process and ``init`` it: serving (with ``self.restore`` if set),
        or with ``standby`` built and waiting for ``start``. CommandError if it fails."""
        pid, channel, parent = await self.zygote.spawn(self.fid)
        proc = _Process.make(pid, channel, self.zygote, parent, self._event)
        self._nursery.start_soon(proc.read)
        args, fds = self.init_args(), []
        restore = None
        if standby:
            args["standby"] = True
        else:
            restore, self.restore = self.restore, None
            fds = [self.listener.fileno()]
            if restore is not None:
                args["restore"] = restore[0]
                fds += restore[1]
        try:
            await proc.rpc.call("init", args, fds, timeout=INIT_TIMEOUT)
        except (Closed, CommandError) as exc:
            proc.kill()
            status = await proc.reap()
            if isinstance(exc, CommandError):
                raise
            raise CommandError("internal", f"worker {pid} for fid {self.fid:#x} died while "
                                           f"starting: {exit_reason(status)}") from None
        except BaseException:
            proc.kill()
            proc.close_pidfd()
            raise
        finally:
            # The worker has its own copies now (or died: then its VMM is told by the
            # connection closing with these).
            if restore is not None:
                close_fds(restore[1])
        proc.attached = restore is not None and restore[0]["fields"].get("endpoint") is not None
        return proc

    def _serve(self, proc: _Process) -> None:
        self.proc, self.pid, self.state = proc, proc.pid, "serving"
        self.log.info("worker_started", fid=self.fid, uid=self.uid, pid=proc.pid)

    async def _died(self, proc: _Process) -> None:
        self.proc = None
        self.state = "restarting"
        status = await proc.reap()
        self.restarts += 1
        self.log.error("worker_died", fid=self.fid, uid=self.uid, pid=proc.pid,
                       reason=exit_reason(status), restarts=self.restarts)

    def _event(self, proc: _Process, msg) -> None:
        if msg.get("event") == "attached":
            proc.attached = True
        elif msg.get("event") == "detached":
            proc.attached = False

    async def call(self, op: str, args: dict[str, Any] | None = None,
                   timeout: float = RPC_TIMEOUT) -> Any:
        if self.state != "serving" or self.rpc is None:
            raise CommandError("unavailable", f"fid {self.fid:#x}: worker is {self.state}; try again")
        try:
            result, fds = await self.rpc.call(op, args, timeout=timeout)
        except Closed:
            raise CommandError("unavailable", f"fid {self.fid:#x}: worker exited while answering "
                                              f"'{op}'") from None
        close_fds(fds)
        return result

    async def refresh_sample(self) -> None:
        try:
            sample = await self.call("sample", timeout=SAMPLE_TIMEOUT)
        except CommandError:
            return  # keep the last sample
        if metrics.valid_sample(sample):
            self.sample = sample
        else:
            self.log.warning("worker_sample_malformed", fid=self.fid, uid=self.uid)

    async def stop(self) -> None:
        """Ask the worker to exit (its VMM, if any, is detached); kill it if it does not."""
        self.stopping = True
        rpc = self.rpc
        if rpc is None or rpc.closed:
            return  # not running: cancelling run() is all it takes
        try:
            await rpc.call("stop", timeout=STOP_TIMEOUT)
        except (Closed, CommandError):
            pass
        with trio.move_on_after(STOP_TIMEOUT):
            await self._gone.wait()

    # ------------------------------------------------------------------ live restart
    async def quiesce_and_snapshot(self, timeout: float = QUIESCE_TIMEOUT) -> tuple[dict, list[int]]:
        """Quiesce the worker and take its session's snapshot (document, fds now ours).

        The worker stays quiesced: ``abandon`` (hand-over done) or ``resume`` follows.
        """
        if self.state != "serving" or self.rpc is None:
            raise CommandError("unavailable", f"fid {self.fid:#x}: worker is {self.state}")
        rpc = self.rpc
        try:
            try:
                result, fds = await rpc.call("handover", {"timeout": timeout},
                                             timeout=timeout + RPC_TIMEOUT)
            except CommandError as exc:
                if exc.code != "not-supported":
                    raise
                # A worker of an older zpcid (adopted in an upgrade): the two steps.
                await rpc.call("quiesce", {"timeout": timeout}, timeout=timeout + RPC_TIMEOUT)
                try:
                    result, fds = await rpc.call("snapshot")
                except CommandError:
                    await rpc.call("resume")
                    raise
        except Closed:
            raise CommandError("unavailable", f"fid {self.fid:#x}: worker exited") from None
        return result["state"], fds

    async def resume(self) -> None:
        if self.rpc is not None:
            try:
                await self.rpc.call("resume")
            except (Closed, CommandError):
                pass

    async def abandon(self) -> None:
        """For a hand-over to another supervisor: the worker lets go (it exits) without
        a word to its VMM, and this handle stops."""
        self.stopping = True
        await self._let_go(self.proc)

    async def _let_go(self, proc: _Process | None) -> None:
        if proc is not None:
            try:
                await proc.rpc.call("abandon", timeout=STOP_TIMEOUT)
            except (Closed, CommandError):
                proc.kill()  # it must not touch the VMM socket any more

    async def detach(self) -> dict[str, Any] | None:
        """For an upgrade (re-exec): stop talking to the worker at a frame boundary and
        leave it serving; returns its pid, channel fd (now the caller's), next request
        id and whether a VMM is attached. None if no worker is serving."""
        self.stopping = True
        proc = self.proc
        if proc is None or self.state != "serving" or proc.gone.is_set():
            return None
        proc.read_scope.cancel()
        with trio.CancelScope(shield=True):
            await proc.read_done.wait()  # the reader stops between two frames
        self.proc = None
        proc.close_pidfd()
        return {"pid": proc.pid, "fd": proc.rpc.channel.detach(), "next_id": proc.rpc.next_id,
                "attached": proc.attached, "zygote": proc.zygote}

    async def prepare_successor(self) -> _Process:
        """A new worker (from the current zygote) with the function built, not yet serving;
        the serving one is untouched. CommandError if it cannot start."""
        if self.state != "serving":
            raise CommandError("unavailable", f"fid {self.fid:#x}: worker is {self.state}")
        return await self._launch(standby=True)

    async def discard(self, proc: _Process) -> None:
        """A successor that will not be used."""
        proc.kill()
        await proc.reap()

    def _drop(self, proc: _Process) -> None:
        """``discard`` without waiting (also where we are being cancelled)."""
        proc.kill()
        try:
            self._nursery.start_soon(proc.reap)
        except RuntimeError:  # this handle has stopped: nobody collects the status
            proc.close_pidfd()

    async def switch_to(self, successor: _Process, timeout: float = QUIESCE_TIMEOUT,
                        retire_now: bool = True) -> dict[str, Any]:
        """Hand the function to ``successor`` (from ``prepare_successor``). The pause is
        quiesce + snapshot + restore only; on failure before the successor has taken
        over, the old worker goes on serving. The old one is let go at once, or with
        ``retire_now`` False at ``retire_replaced`` (it idles, quiesced, till then: its
        exit then does not compete for the CPU with the next function's pause)."""
        old = self.proc
        t0 = trio.current_time()
        try:
            doc, fds = await self.quiesce_and_snapshot(timeout)
        except BaseException:
            self._drop(successor)
            raise
        paused = trio.current_time()
        try:
            await successor.rpc.call("start", {"restore": doc}, [self.listener.fileno(), *fds],
                                     timeout=INIT_TIMEOUT)
        except BaseException as exc:
            self._drop(successor)
            if isinstance(exc, CommandError) and exc.code != "busy":
                await self.resume()  # it answered before taking anything: the old one goes on
            else:
                # It may have read from the VMM socket (or, cancelled, we cannot tell): the
                # old state is stale. Like a crash, the VMM is told by its connection closing.
                old.kill()
            if not isinstance(exc, (Closed, CommandError)):
                raise
            raise CommandError("internal", f"fid {self.fid:#x}: the new worker did not take over: "
                                           f"{getattr(exc, 'message', exc)}") from None
        finally:
            close_fds(fds)  # the successor has its own copies
        now = trio.current_time()
        successor.attached = doc["fields"].get("endpoint") is not None
        self._serve(successor)
        old.successor = successor
        old.ended.set()
        self._replaced.append(old)
        if retire_now:
            self.retire_replaced()
        self.log.info("worker_replaced", fid=self.fid, uid=self.uid, old_pid=old.pid, pid=successor.pid,
                      quiesce_ms=round((paused - t0) * 1e3, 2), pause_ms=round((now - t0) * 1e3, 2))
        return {"old_pid": old.pid, "pid": successor.pid, "attached": successor.attached,
                "pause_ms": round((now - t0) * 1e3, 3)}

    def retire_replaced(self) -> None:
        """Let the workers replaced so far go (in the background)."""
        while self._replaced:
            self._nursery.start_soon(self._retire, self._replaced.pop())

    async def _retire(self, proc: _Process) -> None:
        await self._let_go(proc)
        with trio.move_on_after(STOP_TIMEOUT):
            await proc.gone.wait()
        if not proc.gone.is_set():
            proc.kill()
        await proc.reap()

    async def live_restart(self, timeout: float = QUIESCE_TIMEOUT) -> dict[str, Any]:
        """Replace the worker by a new process (new code) with its VMM staying attached."""
        return await self.switch_to(await self.prepare_successor(), timeout)

    def drop_restore(self) -> None:
        if self.restore is not None:
            close_fds(self.restore[1])
            self.restore = None

    def summary(self) -> dict[str, Any]:
        return {"pid": self.pid if self.state == "serving" else None, "worker_state": self.state,
                "restarts": self.restarts}
