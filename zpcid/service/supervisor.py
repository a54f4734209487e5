"""The supervisor's side of the worker processes: the zygote handle and one handle per worker."""

from __future__ import annotations

import os
import signal
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

    def __init__(self, channel: Channel, on_event):
        self.channel = channel
        self.on_event = on_event
        self._next = 0
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

    async def read(self) -> None:
        """Until the peer closes; then every waiting call fails."""
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


class Zygote:
    """The fork server process: started on first use and again whenever it has died."""

    def __init__(self, log_format: str, log_level: str):
        self.log_format, self.log_level = log_format, log_level
        self.log = log.get("zpcid.service.supervisor")
        self._rpc: _Rpc | None = None
        self._proc: trio.Process | None = None
        self._lock = trio.Lock()
        self._exits: dict[int, int] = {}  # pid -> waitpid status, until collected
        self._exited = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _ensure(self) -> _Rpc:
        if self._rpc is not None and not self._rpc.closed:
            return self._rpc
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
        self._nursery.start_soon(self._watch, self._rpc, self._proc)
        self.log.info("zygote_started", pid=self._proc.pid)
        return self._rpc

    async def _watch(self, rpc: _Rpc, proc: trio.Process) -> None:
        await rpc.read()
        rpc.channel.close()
        with trio.move_on_after(EXIT_REPORT_TIMEOUT):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        self.log.warning("zygote_exited", pid=proc.pid, code=proc.returncode)
        self._exited.set()  # its workers' exit statuses will never come

    def _event(self, msg) -> None:
        if msg.get("event") == "exited" and isinstance(msg.get("pid"), int):
            self._exits[msg["pid"]] = int(msg.get("status", 0))
            if len(self._exits) > 4096:  # statuses nobody collected (never expected): bound them
                self._exits.pop(next(iter(self._exits)))
            self._exited.set()
            self._exited = trio.Event()

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
            rpc = await self._ensure()
        try:
            await rpc.call("ready?", timeout=INIT_TIMEOUT)  # any answer means it is serving
        except CommandError:
            pass
        except Closed:
            raise CommandError("unavailable", "the new zygote died at start") from None

    async def exit_status(self, pid: int, parent: _Rpc,
                          timeout: float = EXIT_REPORT_TIMEOUT) -> int | None:
        """The waitpid status the zygote ``parent`` reports for ``pid`` (None: it never will)."""
        with trio.move_on_after(timeout):
            while pid not in self._exits:
                if parent.closed:
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


@attrs.define(eq=False)
class WorkerHandle:
    """One function's worker as the supervisor sees it; restarts it when it dies."""

    zygote: Zygote
    fid: int
    uid: int
    init_args: Any  # callable: () -> (args dict for `init`); the config may change between restarts
    listener: Any  # the listening socket (a trio socket) the supervisor owns
    pid: int | None = None
    state: str = "starting"
    attached: bool = False
    restarts: int = 0
    sample: dict | None = None
    rpc: _Rpc | None = None
    stopping: bool = False
    log: Any = attrs.field(factory=lambda: log.get("zpcid.service.supervisor"))
    _pidfd: int | None = None
    _gone: trio.Event = attrs.field(factory=trio.Event)
    # Live restart: the state the next incarnation starts from (document, fds we hold),
    # and whether the current one's exit is the hand-over rather than a crash.
    restore: tuple[dict, list[int]] | None = None
    replacing: bool = False
    _serving: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep a worker running until cancelled or stopped; the first start's error propagates."""
        backoff = BACKOFF_FIRST
        first = [True]

        def serving():
            if first[0]:
                first[0] = False
                task_status.started(self)
        try:
            while not self.stopping:
                started = trio.current_time()
                try:
                    await self._incarnation(serving)
                except (CommandError, ChannelError) as exc:
                    if first[0]:
                        raise
                    self.state = "restarting"
                    self.log.error("worker_start_failed", fid=self.fid, uid=self.uid,
                                   error=str(getattr(exc, "message", exc)))
                if self.stopping:
                    break
                if self.replacing:
                    self.replacing = False
                    continue  # a hand-over: the successor starts at once
                if trio.current_time() - started > HEALTHY_AFTER:
                    backoff = BACKOFF_FIRST
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            self._kill()
            self._close_pidfd()
            self.drop_restore()
            self.state = "stopped"
            self._gone.set()

    async def _incarnation(self, serving) -> None:
        """Start one worker process and return when it has gone."""
        self.state = "starting"
        pid, channel, parent = await self.zygote.spawn(self.fid)
        self.pid = pid
        self._close_pidfd()
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None  # already gone: the channel tells us at once
        rpc = _Rpc(channel, self._event)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as n:
                n.start_soon(rpc.read)
                args, fds = self.init_args(), [self.listener.fileno()]
                restore, self.restore = self.restore, None
                if restore is not None:
                    args = dict(args, restore=restore[0])
                    fds += restore[1]
                try:
                    await rpc.call("init", args, fds, timeout=INIT_TIMEOUT)
                except (Closed, CommandError) as exc:
                    failure = exc
                    n.cancel_scope.cancel()
                else:
                    self.rpc = rpc
                    self.attached = restore is not None and restore[0]["fields"].get("endpoint") is not None
                    self.state = "serving"
                    self.log.info("worker_started", fid=self.fid, uid=self.uid, pid=pid,
                                  restored=restore is not None)
                    self._serving.set()
                    serving()
                finally:
                    # The worker has its own copies now (or died: then its VMM is
                    # told by the connection closing with these).
                    if restore is not None:
                        close_fds(restore[1])
                # the nursery ends when the reader sees end of file: the worker is gone
        finally:
            channel.close()
            self.rpc = None
            self.attached = False
        if failure is not None:
            self._kill()
            if isinstance(failure, CommandError):
                raise failure
            status = await self.zygote.exit_status(pid, parent)
            raise CommandError("internal", f"worker {pid} for fid {self.fid:#x} died while "
                                           f"starting: {exit_reason(status)}")
        status = await self.zygote.exit_status(pid, parent)
        self._close_pidfd()
        if self.stopping or self.replacing:
            return
        self.restarts += 1
        self.state = "restarting"
        self.log.error("worker_died", fid=self.fid, uid=self.uid, pid=pid,
                       reason=exit_reason(status), restarts=self.restarts)

    def _event(self, msg) -> None:
        if msg.get("event") == "attached":
            self.attached = True
        elif msg.get("event") == "detached":
            self.attached = False

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
        """The old worker lets go (it exits) without a word to its VMM."""
        self.replacing = True
        self._serving = trio.Event()
        if self.rpc is not None:
            try:
                await self.rpc.call("abandon", timeout=STOP_TIMEOUT)
            except (Closed, CommandError):
                self._kill()  # it must not touch the VMM socket any more

    async def live_restart(self, timeout: float = QUIESCE_TIMEOUT) -> dict[str, Any]:
        """Replace the worker by a new process (new code) with its VMM staying attached."""
        t0 = trio.current_time()
        doc, fds = await self.quiesce_and_snapshot(timeout)
        paused = trio.current_time()
        self.restore = (doc, fds)
        old = self.pid
        await self.abandon()
        with trio.move_on_after(INIT_TIMEOUT):
            await self._serving.wait()
        if self.state != "serving":
            raise CommandError("internal", f"fid {self.fid:#x}: the new worker did not start")
        now = trio.current_time()
        self.log.info("worker_replaced", fid=self.fid, uid=self.uid, old_pid=old, pid=self.pid,
                      quiesce_ms=round((paused - t0) * 1e3, 2), pause_ms=round((now - t0) * 1e3, 2))
        return {"old_pid": old, "pid": self.pid, "attached": self.attached,
                "pause_ms": round((now - t0) * 1e3, 3)}

    def drop_restore(self) -> None:
        if self.restore is not None:
            close_fds(self.restore[1])
            self.restore = None

    def _kill(self) -> None:
        if self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except OSError:
                pass

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def summary(self) -> dict[str, Any]:
        return {"pid": self.pid if self.state == "serving" else None, "worker_state": self.state,
                "restarts": self.restarts}

