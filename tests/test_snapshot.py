"""The common snapshot base: versions and fds are checked before anything is restored."""

from __future__ import annotations

import attrs
import pytest

from zpcid.snapshot import Snapshot, SnapshotError


@attrs.frozen
class _Layer(Snapshot):
    VERSION = 3
    value: int = 0
    backing: int = -1  # index into the fd list


def test_version_and_fds_are_checked():
    snap = _Layer(version=3, value=7, backing=0)
    snap.check([5], needed=1)
    with pytest.raises(SnapshotError, match="version 2"):
        _Layer(version=2).check()
    with pytest.raises(SnapshotError, match="needs 1 fds"):
        snap.check([], needed=1)
    assert snap.as_dict() == {"version": 3, "value": 7, "backing": 0}
    assert attrs.evolve(snap, value=8) != snap
