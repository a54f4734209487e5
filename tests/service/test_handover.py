"""Hand-over carriers: sealed state memfd, re-exec with inherited fds, systemd's fd store."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from zpcid.service import handover as H
from fake_systemd import FakeSystemd

# The receiving side: takes the hand-over and reports doc + what each fd is.
RECEIVER = r"""
import json, os, sys
from zpcid.service import handover as H
try:
    b = H.receive(notify_address=os.environ.get("NOTIFY_SOCKET"))
except H.HandoverError as exc:
    print(json.dumps({"error": str(exc)})); sys.exit(0)
if b is None:
    print(json.dumps(None)); sys.exit(0)
out = {"doc": b.doc, "fds": []}
for fd in b.fds:
    st = os.fstat(fd)
    out["fds"].append([st.st_ino, os.get_inheritable(fd)])
# the first fd is a pipe to the test: prove it is the same pipe
os.write(b.fds[0], b"through")
print(json.dumps(out))
"""

# The sending side: builds a bundle of its inherited fds and re-execs into RECEIVER.
SENDER = r"""
import os, sys
from zpcid.service import handover as H
fds = [int(x) for x in sys.argv[1].split(",")]
H.exec_argv([sys.executable, "-c", sys.argv[2]], H.Bundle({"functions": [{"fid": 1}]}, fds))
"""


def test_state_memfd_is_sealed_and_read_back():
    fd = H.write_state({"a": [1, 2]}, 3)
    try:
        assert H.read_state(fd) == ({"a": [1, 2]}, 3)
        with pytest.raises(OSError):
            os.write(fd, b"x")  # sealed against writes
    finally:
        os.close(fd)
    plain = os.memfd_create("x", os.MFD_ALLOW_SEALING)
    os.write(plain, b'{"format": 1, "nfds": 0, "doc": {}}')
    with pytest.raises(H.HandoverError, match="not sealed"):
        H.read_state(plain)
    os.close(plain)


def test_reexec_hands_over_fds_and_state():
    r, w = os.pipe()
    mem = os.memfd_create("payload")
    try:
        p = subprocess.run([sys.executable, "-c", SENDER, f"{w},{mem}", RECEIVER],
                           pass_fds=(w, mem), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["doc"] == {"functions": [{"fid": 1}]}
        assert [ino for ino, _ in out["fds"]] == [os.fstat(w).st_ino, os.fstat(mem).st_ino]
        assert not any(inh for _, inh in out["fds"])  # not leaked to the receiver's children
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"through"
    finally:
        for fd in (r, w, mem):
            if fd >= 0:
                os.close(fd)


def test_fd_store_round_trip_and_stale_entries_removed(sock_dir):
    sd = FakeSystemd(os.path.join(sock_dir, "notify"))
    r, w = os.pipe()
    try:
        stale = os.memfd_create("stale")
        sd.store.append((H.FD_NAME_PREFIX + "7", stale))  # left by an older hand-over
        names = H.fdstore_push(sd.address, H.Bundle({"x": 1}, [w, r]))
        sd.pump()
        assert names == [H.FD_NAME_PREFIX + "0", H.FD_NAME_PREFIX + "1", H.STATE_NAME]
        assert sd.names() == [H.FD_NAME_PREFIX + "7", *names]
        os.close(w)
        w = -1
        proc = sd.start([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=60)
        out = json.loads(out)
        assert out["doc"] == {"x": 1}
        assert os.read(r, 100) == b"through"
        sd.pump()
        assert sd.names() == []  # the receiver took everything out of the store
        # with nothing in the store the next start has no hand-over
        proc = sd.start([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        assert json.loads(proc.communicate(timeout=60)[0]) is None
    finally:
        sd.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_half_pushed_hand_over_is_ignored_and_cleared(sock_dir):
    sd = FakeSystemd(os.path.join(sock_dir, "notify"))
    try:
        sd.store.append((H.FD_NAME_PREFIX + "0", os.memfd_create("orphan")))  # no state: interrupted
        proc = sd.start([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        assert json.loads(proc.communicate(timeout=60)[0]) is None
        sd.pump()
        assert sd.names() == []
    finally:
        sd.close()


def test_unusable_state_is_an_error_not_a_crash(sock_dir):
    sd = FakeSystemd(os.path.join(sock_dir, "notify"))
    try:
        bad = os.memfd_create("bad", os.MFD_ALLOW_SEALING)
        os.write(bad, b'{"format": 99, "nfds": 0, "doc": {}}')
        fcntl.fcntl(bad, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        sd.store.append((H.STATE_NAME, bad))
        proc = sd.start([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE, text=True)
        out = json.loads(proc.communicate(timeout=60)[0])
        assert "unknown format 99" in out["error"]
        sd.pump()
        assert sd.names() == []
    finally:
        sd.close()
