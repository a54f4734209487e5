"""Hand-over inputs that are broken or hostile: each is a HandoverError naming the
problem, with every descriptor it carried closed, never a crash or a leak."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from fake_systemd import FakeSystemd
from zpcid.service import handover as H

from .test_handover import RECEIVER

SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed(data: bytes) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.write(fd, data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_bundle_close_closes_its_fds_once():
    a, b = os.pipe()
    bundle = H.Bundle({"x": 1})
    assert (bundle.add_fd(a), bundle.add_fd(b)) == (0, 1)
    os.close(b)  # already gone: close() must not mind
    bundle.close()
    assert not is_open(a) and bundle.fds == []


@pytest.mark.parametrize("payload, message", [
    (b"\xff not json", "not JSON"),
    (b"[1, 2]", "unknown format None"),
    (json.dumps({"format": 1, "nfds": "2", "doc": {}}).encode(), "unknown format 1"),
    (json.dumps({"format": 1, "nfds": 0, "doc": []}).encode(), "unknown format 1"),
])
def test_state_that_is_not_our_envelope_is_refused(payload, message):
    fd = sealed(payload)
    try:
        with pytest.raises(H.HandoverError, match=message):
            H.read_state(fd)
    finally:
        os.close(fd)


def test_state_that_is_not_a_memfd_is_refused():
    r, w = os.pipe()
    try:
        with pytest.raises(H.HandoverError, match="not a sealed memfd"):
            H.read_state(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("value", ["x:1,2", "3:a", ":"])
def test_malformed_handover_variable_is_refused(value):
    with pytest.raises(H.HandoverError, match="malformed"):
        H.receive({H.HANDOVER_ENV: value})


def test_fd_count_that_disagrees_with_the_state_closes_everything():
    state = H.write_state({"f": 1}, 2)
    r, w = os.pipe()
    with pytest.raises(H.HandoverError, match="names 1 fds, its state expects 2"):
        H.receive({H.HANDOVER_ENV: f"{state}:{r}"})
    assert not is_open(state) and not is_open(r)
    os.close(w)


def test_named_fd_that_is_not_open_is_refused():
    state = H.write_state({}, 2)
    r, w = os.pipe()
    os.close(w)  # the hand-over names a descriptor that is gone
    with pytest.raises(H.HandoverError, match=f"inherited fd {w} is not open"):
        H.receive({H.HANDOVER_ENV: f"{state}:{r},{w}"})
    assert not is_open(state) and not is_open(r)


def test_reexec_of_a_missing_program_keeps_this_process_and_its_fds():
    r, w = os.pipe()
    try:
        with pytest.raises(H.HandoverError, match="cannot execute /nonexistent/zpcid"):
            H.exec_argv(["/nonexistent/zpcid"], H.Bundle({}, [r, w]), environ={})
        # Still ours, and not leaked into children any more.
        assert is_open(r) and not os.get_inheritable(r) and not os.get_inheritable(w)
    finally:
        os.close(r)
        os.close(w)


def test_fd_store_push_without_a_service_manager_is_an_error(sock_dir):
    r, w = os.pipe()
    try:
        with pytest.raises(H.HandoverError, match="cannot store fds"):
            H.fdstore_push(os.path.join(sock_dir, "no-manager"), H.Bundle({}, [r]))
        H.fdstore_remove(os.path.join(sock_dir, "no-manager"), ["zpcid-fd-0"])  # logged only
        assert is_open(r)
    finally:
        os.close(r)
        os.close(w)


def _listen_env(names: list[str], n: int | str | None = None) -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(names) if n is None else n),
            "LISTEN_FDNAMES": ":".join(names)}


def test_listen_fds_for_another_process_or_garbled_are_ignored():
    assert H.receive({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None
    assert H.receive(_listen_env([], n="many")) is None
    assert H.receive({}) is None


def test_fd_store_entries_of_a_state_without_all_its_fds_are_refused_and_removed(sock_dir):
    sd = FakeSystemd(os.path.join(sock_dir, "notify"))
    try:
        # A state expecting two fds, only the first of them, and an entry not ours.
        sd.store.append((H.FD_NAME_PREFIX + "0", os.memfd_create("fd0")))
        sd.store.append((H.STATE_NAME, H.write_state({"f": 1}, 2)))
        sd.store.append(("someone-elses", os.memfd_create("other")))
        proc = sd.start([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        out = json.loads(proc.communicate(timeout=60)[0])
        assert f"lacks {H.FD_NAME_PREFIX}1" in out["error"]
        sd.pump()
        assert sd.names() == ["someone-elses"]  # ours dropped from the store, the other kept
    finally:
        sd.close()
