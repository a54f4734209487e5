"""The fork server: a clean, pre-imported, single-threaded process that forks workers.

The supervisor execs it once (``python -m zpcid.service.zygote --fd N``) and
asks it over the channel for one worker per function. Forking from here rather
than from the supervisor means a worker starts with no trio state, no threads
and no descriptors but its channel, and every worker shares this process's
interpreter pages (imports done once, ``gc.freeze`` keeps the collector from
touching, and so copying, the shared objects).
"""

from __future__ import annotations

import argparse
import gc
import os
import selectors
import signal
import socket
import sys

from zpcid import log
from zpcid.service.channel import ChannelError, Closed, SyncChannel, error, set_process_name
from zpcid.vfio_user.transport import close_fds

# Threads a numeric library would start at import time must not exist when we fork.
SINGLE_THREADED_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def preload() -> None:
    """Import everything a worker runs, so forked workers share it."""
    from zpcid import devices
    from zpcid.service import worker  # noqa: F401 - imported for its side effect: loaded once

    devices.load_all()
    gc.collect()
    gc.freeze()


class Zygote:
    def __init__(self, sock: socket.socket):
        self.channel = SyncChannel(sock)
        self.sock = sock
        self.children: set[int] = set()
        self.log = log.get("zpcid.service.zygote")

    def serve(self) -> int:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        sel.register(r, selectors.EVENT_READ)
        try:
            while True:
                for key, _ in sel.select():
                    if key.fileobj == r:
                        try:
                            os.read(r, 512)
                        except BlockingIOError:
                            pass
                        self._reap()
                    else:
                        try:
                            msg, fds = self.channel.recv()
                        except Closed:
                            return 0  # the supervisor is gone: so are we
                        self._request(msg, fds, (r, w))
        except ChannelError as exc:
            self.log.error("zygote_channel_broken", error=str(exc))
            return 1

    def _request(self, msg, fds, pipe) -> None:
        rid = msg.get("id")
        if msg.get("op") != "spawn" or len(fds) != 1:
            close_fds(fds)
            self.channel.send(error(rid, "bad-request", "expected op 'spawn' with one descriptor"))
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                self.sock.close()
                os.close(pipe[0])
                os.close(pipe[1])
                from zpcid.service import worker
                code = worker.main(fds[0])
            except BaseException:
                self.log.exception("worker_crashed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fds[0])
        self.children.add(pid)
        self.channel.send({"id": rid, "ok": True, "result": {"pid": pid}})

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.channel.send({"event": "exited", "pid": pid, "status": status})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zpcid-zygote")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--log-format", default="json")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    # Ctrl-C and SIGHUP are the supervisor's; it stops and reloads us through the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log.configure(args.log_format, args.log_level)
    set_process_name("zpcid-zygote")
    sock = socket.socket(fileno=args.fd)
    preload()
    code = Zygote(sock).serve()
    # No interpreter teardown (every module of zpcid is loaded here): it would only burn
    # CPU while the supervisor pauses a function for a live restart that replaced us.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
