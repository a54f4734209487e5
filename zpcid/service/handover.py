"""Carrying state and open files from one zpcid process to the next.

A hand-over is a :class:`Bundle`: a JSON document (the snapshots, with fds
as indexes) and the list of fds it refers to (listening and connected sockets,
DMA-map files, eventfds, memfds, backing files).  The document travels in a
sealed memfd, so the receiver reads exactly what the sender wrote and nobody
can change it in between.  Two carriers:

* re-exec (no service manager): the fds are made inheritable and the process
  ``execve``\\ s itself (or a new binary); ``$ZPCID_HANDOVER`` names the memfd
  and the fd numbers, which ``execve`` keeps.
* systemd's fd store: every fd goes to the manager with ``FDSTORE=1`` and a
  ``FDNAME=``; the memfd is named ``zpcid-state``.  The next instance gets them
  back through ``LISTEN_FDS``/``LISTEN_FDNAMES`` (sd_listen_fds(3)) and drops
  the entries from the store (``FDSTOREREMOVE=1``) once it has taken them, so
  a later crash restart does not get stale state.

Nothing here knows what the document means; the daemon fills and reads it.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
from typing import Any, Iterable, Mapping

import attrs

from zpcid import log

HANDOVER_ENV = "ZPCID_HANDOVER"
STATE_NAME = "zpcid-state"
FD_NAME_PREFIX = "zpcid-fd-"
SD_LISTEN_FDS_START = 3
FORMAT = 1  # of the envelope below; the snapshots inside carry their own versions
MAX_STATE = 256 << 20
FDSTORE_SEND_TIMEOUT = 10.0
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE

_log = log.get("zpcid.service.handover")


class HandoverError(Exception):
    """A hand-over that cannot be sent or is not usable; the message says why."""


@attrs.define
class Bundle:
    """What one process hands the next: a JSON-safe document and the fds it indexes."""

    doc: dict[str, Any]
    fds: list[int] = attrs.field(factory=list)

    def add_fd(self, fd: int) -> int:
        """Append ``fd`` (borrowed) and return its index for the document."""
        self.fds.append(fd)
        return len(self.fds) - 1

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


# --------------------------------------------------------------------- sealed state
def write_state(doc: Mapping[str, Any], nfds: int) -> int:
    """A sealed memfd holding the envelope around ``doc`` (caller owns the fd)."""
    data = json.dumps({"format": FORMAT, "nfds": nfds, "doc": doc}, separators=(",", ":")).encode()
    if len(data) > MAX_STATE:
        raise HandoverError(f"hand-over state of {len(data)} bytes exceeds {MAX_STATE}")
    fd = os.memfd_create(STATE_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int) -> tuple[dict[str, Any], int]:
    """The document and fd count in a sealed state memfd; refuses an unsealed one."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise HandoverError(f"hand-over state is not a sealed memfd: {exc}") from None
    if seals & _SEALS != _SEALS:
        raise HandoverError("hand-over state memfd is not sealed against writes")
    size = os.fstat(fd).st_size
    if size > MAX_STATE:
        raise HandoverError(f"hand-over state of {size} bytes exceeds {MAX_STATE}")
    data = os.pread(fd, size, 0)
    try:
        env = json.loads(data)
    except ValueError as exc:
        raise HandoverError(f"hand-over state is not JSON: {exc}") from None
    if not isinstance(env, dict) or env.get("format") != FORMAT or not isinstance(env.get("doc"), dict) \
            or not isinstance(env.get("nfds"), int):
        raise HandoverError(f"hand-over state of an unknown format {env.get('format') if isinstance(env, dict) else None!r}")
    return env["doc"], env["nfds"]


# --------------------------------------------------------------------- re-exec
def exec_argv(argv: list[str], bundle: Bundle, environ: Mapping[str, str] | None = None) -> None:
    """Replace this process by ``argv`` with the bundle's fds inherited. Does not return
    unless exec fails (HandoverError; the fds are then as before, not inheritable)."""
    state = write_state(bundle.doc, len(bundle.fds))
    fds = list(bundle.fds) + [state]
    env = dict(os.environ if environ is None else environ)
    env[HANDOVER_ENV] = f"{state}:{','.join(map(str, bundle.fds))}"
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(key, None)  # ours go by $ZPCID_HANDOVER, not by sd_listen_fds
    try:
        for fd in fds:
            os.set_inheritable(fd, True)
        os.execve(argv[0], argv, env)
    except OSError as exc:
        for fd in fds:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
        os.close(state)
        raise HandoverError(f"cannot execute {argv[0]}: {exc}") from None


def _receive_exec(value: str) -> Bundle:
    head, _, rest = value.partition(":")
    try:
        state = int(head)
        fds = [int(x) for x in rest.split(",") if x]
    except ValueError:
        raise HandoverError(f"${HANDOVER_ENV} is malformed: {value!r}") from None
    try:
        doc, nfds = read_state(state)
    finally:
        _close(state)
    if nfds != len(fds):
        _close_all(fds)
        raise HandoverError(f"hand-over names {len(fds)} fds, its state expects {nfds}")
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            _close_all(fds)
            raise HandoverError(f"inherited fd {fd} is not open: {exc}") from None
    return Bundle(doc, fds)


# --------------------------------------------------------------------- systemd fd store
def fdstore_push(notify_address: str, bundle: Bundle) -> list[str]:
    """Store the bundle's fds and its state in the service manager; returns the names used.

    Each fd goes in its own message with its own ``FDNAME`` so the names come
    back one per fd in ``LISTEN_FDNAMES``.
    """
    state = write_state(bundle.doc, len(bundle.fds))
    names = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # The manager reads as we send; a queue that stays full means it does not.
            sock.settimeout(FDSTORE_SEND_TIMEOUT)
            for i, fd in enumerate(bundle.fds):
                names.append(f"{FD_NAME_PREFIX}{i}")
                _sd_send(sock, notify_address, f"FDSTORE=1\nFDNAME={names[-1]}", [fd])
            # The state goes last: a half-pushed hand-over has no state and is ignored.
            _sd_send(sock, notify_address, f"FDSTORE=1\nFDNAME={STATE_NAME}", [state])
            names.append(STATE_NAME)
    except OSError as exc:
        raise HandoverError(f"cannot store fds in the service manager: {exc}") from None
    finally:
        os.close(state)
    return names


def fdstore_remove(notify_address: str, names: Iterable[str]) -> None:
    """Drop entries from the fd store (``FDSTOREREMOVE=1``); errors are logged only."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            for name in names:
                _sd_send(sock, notify_address, f"FDSTOREREMOVE=1\nFDNAME={name}", [])
    except OSError as exc:
        _log.warning("fdstore_remove_failed", error=str(exc))


def _sd_send(sock: socket.socket, address: str, text: str, fds: list[int]) -> None:
    addr = "\0" + address[1:] if address.startswith("@") else address
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([text.encode()], anc, 0, addr)


def _receive_listen_fds(environ: Mapping[str, str], notify_address: str | None) -> Bundle | None:
    """Our entries among ``LISTEN_FDS``, taken and removed from the store."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        n = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    names = environ.get("LISTEN_FDNAMES", "").split(":") if n else []
    if len(names) != n:
        names = [""] * n
    by_name = {name: SD_LISTEN_FDS_START + i for i, name in enumerate(names)}
    for fd in by_name.values():
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    ours = {k: v for k, v in by_name.items() if k == STATE_NAME or k.startswith(FD_NAME_PREFIX)}
    try:
        return _take(ours)
    finally:
        # Taken (or unusable): either way a later start must not see them again.
        if ours and notify_address:
            fdstore_remove(notify_address, ours)


def _take(ours: dict[str, int]) -> Bundle | None:
    state = ours.get(STATE_NAME)
    if state is None:
        _close_all(ours.values())  # stale pieces of a hand-over that never finished
        return None
    try:
        doc, nfds = read_state(state)
    except HandoverError:
        _close_all(ours.values())
        raise
    finally:
        _close(state)
    fds = []
    for i in range(nfds):
        fd = ours.get(f"{FD_NAME_PREFIX}{i}")
        if fd is None:
            _close_all(v for k, v in ours.items() if k != STATE_NAME)
            raise HandoverError(f"fd store lacks {FD_NAME_PREFIX}{i} of the hand-over")
        fds.append(fd)
    _close_all(set(ours.values()) - set(fds) - {state})  # entries of an older hand-over
    return Bundle(doc, fds)


# --------------------------------------------------------------------- receiving
def receive(environ: Mapping[str, str] | None = None,
            notify_address: str | None = None) -> Bundle | None:
    """The hand-over this process was started with, if any (from re-exec or the fd store).

    The entries taken from the fd store are removed from it, so a later
    restart after a crash starts clean.  Raises HandoverError for a hand-over
    that is present but unusable (its fds are closed by then).
    """
    env = os.environ if environ is None else environ
    value = env.get(HANDOVER_ENV)
    if value:
        if environ is None:
            os.environ.pop(HANDOVER_ENV, None)  # not for our children
        return _receive_exec(value)
    return _receive_listen_fds(env, notify_address)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        _close(fd)
