"""Run the real daemon (the installed ``zpcid`` console script) and talk to it."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zpcid.service import ctl

START_TIMEOUT = 10.0


def command(name: str, module: str) -> list[str]:
    """The console script next to this interpreter (else ``python -m``)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


ZPCID = command("zpcid", "zpcid.cli")
ZPCICTL = command("zpcictl", "zpcid.service.ctl")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def render_config(daemon: dict, functions: list[dict]) -> str:
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in daemon.items()]
    for f in functions:
        lines += ["", "[[function]]"] + [f"{k} = {toml_value(v)}" for k, v in f.items()]
    return "\n".join(lines) + "\n"


def memfn(fid: int, **kw) -> dict:
    return {"type": "memory", "fid": fid, "uid": fid, "name": f"f{fid:x}", "ram-size": 65536} | kw


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path.startswith("@"):
            self.sock.bind("\0" + path[1:])
        else:
            self.sock.bind(path)
        self.address = path
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = START_TIMEOUT,
                 proc: subprocess.Popen | None = None) -> dict[str, str]:
        """Next datagram (after those already consumed) that carries ``key`` (= ``value``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key} notification within {timeout} s; got {self.messages}")
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {proc.returncode} before {key}")
                continue
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(msg)
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()


class Daemon:
    """One ``zpcid serve`` subprocess with its own runtime dir, config and notify socket."""

    def __init__(self, base: str, daemon: dict | None = None, functions: list[dict] | None = None,
                 name: str = "d", notify: str | None = None):
        self.base = base
        self.rdir = os.path.join(base, f"{name}-run")
        self.daemon_table = {"runtime-dir": self.rdir, "log-level": "debug"} | (daemon or {})
        self.config_path = os.path.join(base, f"{name}.toml")
        self.log_path = os.path.join(base, f"{name}.log")
        self.write_config(functions if functions is not None else [memfn(1), memfn(2)])
        self.notify = NotifySocket(notify or os.path.join(base, f"{name}-notify"))
        self.proc: subprocess.Popen | None = None

    @property
    def control(self) -> str:
        return os.path.join(self.rdir, self.daemon_table.get("control-socket", "control.sock"))

    def socket(self, name: str) -> str:
        return os.path.join(self.rdir, f"{name}.sock")

    def write_config(self, functions: list[dict], daemon: dict | None = None) -> None:
        text = render_config(self.daemon_table | (daemon or {}), functions)
        tmp = self.config_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.config_path)

    def start(self, *extra: str, wait: bool = True, env: dict | None = None) -> "Daemon":
        environ = {k: v for k, v in os.environ.items()
                   if k not in ("RUNTIME_DIRECTORY", "WATCHDOG_USEC", "WATCHDOG_PID")}
        environ |= {"NOTIFY_SOCKET": self.notify.address} | (env or {})
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*ZPCID, "serve", "--config", self.config_path,
                                      "--log-format", "json", *extra],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=environ)
        if wait:
            try:
                self.notify.wait_for("READY", "1", proc=self.proc)
            except AssertionError:
                raise AssertionError(f"daemon did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def events(self) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def ctl(self, *argv: str) -> tuple[int, str, str]:
        """zpcictl in-process (same code as the console script) against this daemon."""
        out, err = io.StringIO(), io.StringIO()
        rc = ctl.run(["--socket", self.control, *argv], out=out, err=err)
        return rc, out.getvalue(), err.getvalue()

    def ctl_json(self, *argv: str):
        rc, out, err = self.ctl("--json", *argv)
        assert rc == 0, err
        return json.loads(out)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def reload(self) -> dict[str, str]:
        """SIGHUP, then wait for the READY=1 that ends the reload."""
        self.signal(signal.SIGHUP)
        self.notify.wait_for("RELOADING", "1", proc=self.proc)
        return self.notify.wait_for("READY", "1", proc=self.proc)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc is not None:
            self._log.close()
        self.notify.close()


@pytest.fixture
def daemons(sock_dir):
    """Factory for daemons in a short temp dir; kills what the test left running."""
    started: list[Daemon] = []

    def make(**kw) -> Daemon:
        d = Daemon(sock_dir, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.cleanup()
