"""systemd's side of sd_notify and the fd store, for machines where systemd is not PID 1.

Faithful to what the daemon relies on (sd_notify(3), sd_pid_notify_with_fds(3),
sd_listen_fds(3)): datagrams of KEY=VALUE lines on $NOTIFY_SOCKET; FDSTORE=1 keeps the
fds sent with it under FDNAME (default "stored"); FDSTOREREMOVE=1 closes and drops every
entry of that name; a service (re)started by the manager gets the stored fds from fd 3 on,
LISTEN_FDS=n, LISTEN_FDNAMES=a:b:... and LISTEN_PID=<its own pid>.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time

# Moves the passed fds to 3.. (through high numbers, so no source is overwritten
# before it is moved), sets LISTEN_PID to its own pid, then execs the service.
_LAUNCHER = r"""
import os, sys
src = [int(x) for x in sys.argv[1].split(",") if x]
tmp = [os.dup2(fd, 1000 + i, inheritable=True) for i, fd in enumerate(src)]
for fd in src:
    if fd not in tmp:
        os.close(fd)
for i, fd in enumerate(tmp):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class FakeSystemd:
    def __init__(self, path: str, fd_store_max: int = 1024):
        self.address = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.fd_store_max = fd_store_max
        self.store: list[tuple[str, int]] = []  # (name, fd) in arrival order
        self.messages: list[dict[str, str]] = []

    def pump(self, timeout: float = 0.0, until: str | None = None, proc=None) -> dict[str, str] | None:
        """Take datagrams for up to ``timeout`` s; return the first carrying ``until``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if until is None or left <= 0:
                self.sock.setblocking(False)
            else:
                self.sock.settimeout(left)
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(253 * 4))
            except (BlockingIOError, socket.timeout):
                if until is None or left <= 0:
                    if until is not None:
                        raise AssertionError(f"no {until} within {timeout} s; got {self.messages[-5:]}")
                    return None
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"service exited with {proc.returncode} before {until}")
                continue
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(a)
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            name = msg.get("FDNAME", "stored")
            if msg.get("FDSTOREREMOVE") == "1":
                for n, fd in [e for e in self.store if e[0] == name]:
                    os.close(fd)
                self.store = [e for e in self.store if e[0] != name]
            if msg.get("FDSTORE") == "1":
                for fd in fds:
                    if len(self.store) < self.fd_store_max:
                        self.store.append((name, fd))
                    else:
                        os.close(fd)  # what systemd does past FileDescriptorStoreMax=
            else:
                for fd in fds:
                    os.close(fd)
            if until is not None and until.split("=")[0] in msg and (
                    "=" not in until or msg[until.split("=")[0]] == until.split("=", 1)[1]):
                return msg

    def start(self, argv: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start the service as the manager would, with the fd store passed in."""
        environ = dict(os.environ if env is None else env)
        environ["NOTIFY_SOCKET"] = self.address
        for key in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"):
            environ.pop(key, None)
        fds = [fd for _, fd in self.store]
        if fds:
            environ["LISTEN_FDS"] = str(len(fds))
            environ["LISTEN_FDNAMES"] = ":".join(n for n, _ in self.store)
        return subprocess.Popen([sys.executable, "-c", _LAUNCHER, ",".join(map(str, fds)), *argv],
                                env=environ, pass_fds=fds, **popen)

    def names(self) -> list[str]:
        return [n for n, _ in self.store]

    def close(self) -> None:
        for _, fd in self.store:
            os.close(fd)
        self.store = []
        self.sock.close()
