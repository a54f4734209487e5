"""``zpcictl``: the admin tool for a running zpcid, over its control socket.

Exit codes: 0 success, 1 the daemon refused or failed the command, 2 usage
error, 3 the daemon is not running, 4 access denied, 5 communication error.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from typing import Any

import zpcid
from zpcid.service import config as cfg
from zpcid.service import runtime

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED, EXIT_COMM = 0, 1, 2, 3, 4, 5
DEFAULT_TIMEOUT = 30.0
ENV_SOCKET = "ZPCID_CONTROL_SOCKET"
# Integers shown in hex in human output (identifiers, addresses, codes).
HEX_HINTS = ("fid", "uid", "pchid", "pfgid", "vfn", "fh", "vendor", "device", "pec", "iova",
             "addr", "start", "end", "iota", "ioat", "pba", "pal", "gpa", "sdma", "edma", "target")
DECIMAL = ("restarts",)  # counts whose names happen to contain a hint


class CtlError(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def default_socket() -> str:
    """$ZPCID_CONTROL_SOCKET, else the daemon's default, else the system service's."""
    env = os.environ.get(ENV_SOCKET)
    if env:
        return env
    own = runtime.default_control_socket()
    system = os.path.join(runtime.SYSTEM_RUNTIME_DIR, runtime.CONTROL_SOCKET_NAME)
    if not os.path.exists(own) and os.path.exists(system):
        return system
    return own


def request(path: str, command: str, args: dict[str, Any] | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> Any:
    """One request/response on the control socket; raises CtlError with an exit code."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            why = "no control socket" if isinstance(exc, FileNotFoundError) else "nothing listens on"
            raise CtlError(f"zpcid is not running ({why} {path}); start it with 'zpcid serve' "
                           f"or pass --socket", EXIT_NOT_RUNNING) from None
        except PermissionError:
            raise CtlError(f"access denied to {path}: run as the daemon's user, root, "
                           "or a member of its admin group", EXIT_DENIED) from None
        except OSError as exc:
            raise CtlError(f"cannot connect to {path}: {exc.strerror}", EXIT_COMM) from None
        req = {"command": command, "args": args or {}}
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
        except OSError:
            pass  # a refusing daemon may hang up before reading; its answer is still queued
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except socket.timeout:
            raise CtlError(f"no answer from zpcid within {timeout:g} s", EXIT_COMM) from None
        except OSError as exc:
            if exc.errno != errno.ECONNRESET:
                raise CtlError(f"control socket error: {exc.strerror}", EXIT_COMM) from None
    finally:
        s.close()
    if not buf:
        raise CtlError("zpcid closed the connection without answering", EXIT_COMM)
    try:
        resp = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise CtlError("zpcid sent a malformed answer", EXIT_COMM) from None
    if not resp.get("ok"):
        err = resp.get("error") or {}
        code = EXIT_DENIED if err.get("code") == "permission-denied" else EXIT_FAILED
        raise CtlError(err.get("message", "unknown error"), code)
    return resp.get("result")


# ---------------------------------------------------------------------- formatting
def _fmt(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if (isinstance(value, int) and any(h in key.lower() for h in HEX_HINTS)
            and not key.lower().endswith(DECIMAL)):
        return f"{value:#x}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(key, v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(k, v)}" for k, v in value.items()) or "-"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Aligned columns; the header is the upper-cased keys."""
    if not rows:
        return "(none)"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    cells = [[c.upper() for c in columns]] + [[_fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells)


def _flatten(obj: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in obj.items():
        if isinstance(v, dict) and v and k != "errors":
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def keyvalue(obj: dict[str, Any]) -> str:
    pairs = _flatten(obj)
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {_fmt(k.rsplit('.', 1)[-1], v)}" for k, v in pairs)


# ---------------------------------------------------------------------- commands
def _fid(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid FID {text!r} (decimal or 0x hex)") from None


def _assignments(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CtlError(f"expected KEY=VALUE, got {item!r}", EXIT_USAGE)
        out[key.strip()] = cfg.parse_value(value.strip())
    return out


def _out_list(result, args):
    return table(result, ["fid", "uid", "name", "type", "state", "pid", "restarts", "attached", "socket"])


def _out_remove(result, args):
    fid = f"{result['fid']:#x}"
    if not result["was_attached"]:
        return f"removed fid {fid}"
    if result["released"]:
        return f"removed fid {fid} (the VMM released it)"
    return f"removed fid {fid} (the VMM did not release it in time; detached by force)"


def _out_version(result, args):
    return (f"zpcictl {zpcid.__version__}\nzpcid   {result['version']} (pid {result['pid']}, "
            f"python {result['python']}, trio {result['trio']})")


COMMANDS: dict[str, dict[str, Any]] = {
    "list": {"help": "list the functions", "out": _out_list},
    "show": {"help": "show one function's state and counters", "fid": True, "out": lambda r, a: keyvalue(r)},
    "mappings": {"help": "shadow IOTLB of a function as coalesced ranges", "fid": True,
                 "out": lambda r, a: table(r)},
    "add": {"help": "add a function at run time: KEY=VALUE ... (type=, fid=, uid= required)",
            "out": lambda r, a: f"added fid {r['fid']:#x} ({r['name']}, {r['type']}) on {r['socket']}"},
    "remove": {"help": "remove a function (an attached VMM is asked to release it first)",
               "fid": True, "out": _out_remove},
    "set": {"help": "set zPCI properties of a detached function: KEY=VALUE ...", "fid": True,
            "out": lambda r, a: f"fid {r['fid']:#x}: " + ", ".join(f"{k}={_fmt(k, v)}" for k, v in r["set"].items())},
    "reset": {"help": "reset a function (as DEVICE_RESET)", "fid": True,
              "out": lambda r, a: f"fid {r['fid']:#x} reset"},
    "inject-error": {"help": "inject an error event (to test guest recovery)", "fid": True,
                     "out": lambda r, a: keyvalue(r) if isinstance(r, dict) else str(r)},
    "clear-error": {"help": "end a function's error state (as the guest's reset error indication); "
                            "DMA held back meanwhile resumes", "fid": True,
                    "out": lambda r, a: keyvalue(r)},
    "events": {"help": "events queued or sent for a function", "fid": True, "out": lambda r, a: table(r)},
    "stats": {"help": "daemon-wide statistics", "out": lambda r, a: keyvalue(r)},
    "version": {"help": "versions of zpcictl and the daemon", "out": _out_version},
    "metrics": {"help": "metrics in Prometheus text format", "out": lambda r, a: r["text"].rstrip("\n")},
    "reload": {"help": "re-read the configuration file (as SIGHUP)",
               "out": lambda r, a: f"reloaded; {r['functions']} functions"},
    "restart": {"help": "replace a function's worker process (new code); its VMM stays attached",
                "fid": True,
                "out": lambda r, a: f"fid {r['fid']:#x}: worker {r['old_pid']} -> {r['pid']}, "
                                    f"paused {r['pause_ms']:.1f} ms"},
    "upgrade": {"help": "re-execute zpcid (new code) with every VMM connection kept, then "
                        "replace each worker",
                "out": lambda r, a: _out_upgrade(r)},
}


def _out_upgrade(r) -> str:
    h = r.get("last_handover") or {}
    out = (f"upgraded: pid {r['pid']} serves {h.get('functions', '?')} handed-over functions, "
           f"paused {h.get('pause_ms', float('nan')):.1f} ms")
    failed = h.get("failed") or {}
    if isinstance(failed, dict) and failed:  # those go on in their old workers
        out += "".join(f"\nfid {fid}: still the old worker: {why}" for fid, why in failed.items())
    return out


UPGRADE_WAIT = 60.0


def _upgrade(path: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Ask for the upgrade, then wait for the new process to answer on the same socket."""
    asked = time.monotonic()
    first = request(path, "upgrade", args, timeout)
    deadline = time.monotonic() + UPGRADE_WAIT
    while True:
        time.sleep(0.05)
        try:
            stats = request(path, "stats", {}, timeout)
        except CtlError:
            if time.monotonic() > deadline:
                raise CtlError(f"the new zpcid did not answer within {UPGRADE_WAIT:g} s "
                               f"(pid was {first['pid']})", EXIT_FAILED) from None
            continue
        h = stats.get("last_handover") or {}
        # the new process started after we asked (the old one may have upgraded before)
        if h.get("kind") == "upgrade" and stats.get("uptime_seconds", 1e9) < time.monotonic() - asked:
            return {"pid": stats["pid"], "last_handover": h}
        if time.monotonic() > deadline:
            raise CtlError("the daemon answers but did not restart", EXIT_FAILED)


def _request_args(name: str, a: argparse.Namespace) -> tuple[dict[str, Any], float]:
    args: dict[str, Any] = {}
    timeout = a.timeout
    if getattr(a, "fid", None) is not None:
        args["fid"] = a.fid
    if name == "add":
        args["function"] = _assignments(a.assignments)
    elif name == "set":
        if not a.assignments:
            raise CtlError("set needs at least one KEY=VALUE", EXIT_USAGE)
        args["properties"] = _assignments(a.assignments)
    elif name == "remove":
        if a.release_timeout is not None:
            args["timeout"] = a.release_timeout
            timeout = max(timeout, a.release_timeout + 10)
        else:
            timeout = max(timeout, 3600 + 10)  # the daemon applies its own release-timeout
        args["force"] = a.force
    elif name == "inject-error" and a.pec is not None:
        args["pec"] = a.pec
    elif name == "events":
        args["clear"] = a.clear
    elif name == "upgrade" and a.binary:
        args["binary"] = os.path.abspath(a.binary)
    return args, timeout


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the daemon's JSON result")
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"control socket (default: ${ENV_SOCKET}, else the daemon's default)")
    parser = argparse.ArgumentParser(
        prog="zpcictl", parents=[common], description="Control a running zpcid.",
        epilog="exit codes: 0 ok, 1 command failed, 2 usage, 3 daemon not running, "
               "4 access denied, 5 communication error")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the daemon's answer")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=spec["help"], description=spec["help"])
        if spec.get("fid"):
            p.add_argument("fid", type=_fid, metavar="FID")
        if name in ("add", "set"):
            p.add_argument("assignments", nargs="*" if name == "add" else "+", metavar="KEY=VALUE")
        if name == "remove":
            p.add_argument("--timeout", dest="release_timeout", type=float, metavar="S",
                           help="seconds the VMM gets to release the function (default: "
                                "[daemon] release-timeout)")
            p.add_argument("--force", action="store_true", help="detach an attached VMM at once")
        if name == "inject-error":
            p.add_argument("--pec", type=_fid, metavar="N", help="PCI event code (default 0xb)")
        if name == "events":
            p.add_argument("--clear", action="store_true", help="clear the list after reading it")
        if name == "upgrade":
            p.add_argument("--binary", metavar="PATH",
                           help="execute this zpcid instead of the running one's Python module")
    return parser


def run(argv: list[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    a = build_parser().parse_args(argv)
    as_json = getattr(a, "json", False)
    path = getattr(a, "socket", None) or default_socket()
    try:
        args, timeout = _request_args(a.command, a)
        if a.command == "upgrade":
            result = _upgrade(path, args, timeout)
        else:
            result = request(path, a.command, args, timeout)
    except CtlError as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": str(exc), "exit_code": exc.code}), file=out)
        print(f"zpcictl: {exc}", file=err)
        return exc.code
    if as_json:
        print(json.dumps(result, indent=2, default=str), file=out)
    else:
        print(COMMANDS[a.command]["out"](result, a), file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
