"""The snapshot base: encoding with fds apart, versions, migration."""

import json
import os

import attrs
import pytest
from hypothesis import given, strategies as st

from zpcid import snapshot as S
from zpcid.snapshot import Snapshot, SnapshotError


@attrs.frozen
class Leaf(S.Snapshot):
    KIND = "test.leaf"
    fd: S.Fd
    data: bytes
    n: int


@attrs.frozen
class Tree(S.Snapshot):
    KIND = "test.tree"
    VERSION = 2
    leaves: tuple
    table: dict
    name: str | None = None

    @classmethod
    def migrate(cls, fields, version):
        if version == 1:  # v1 called it "label"
            fields = dict(fields)
            fields["name"] = fields.pop("label")
            return fields
        return super().migrate(fields, version)


def _pipe_fds(n):
    fds = []
    for _ in range(n):
        fds.extend(os.pipe())
    return fds


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.integers(0, 9) | st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)


@given(payload=values, data=st.binary(max_size=64), n=st.integers(0, 1 << 64), picks=st.lists(st.integers(0, 3), max_size=6))
def test_encode_decode_round_trip(payload, data, n, picks):
    fds = _pipe_fds(2)
    try:
        leaves = tuple(Leaf(fd=S.Fd(fds[p]), data=data, n=n) for p in picks)
        tree = Tree(leaves=leaves, table={"x": payload, 3: leaves})
        blob, sent = S.dumps(tree)
        json.loads(blob)  # really JSON
        # one entry per distinct fd, in first-use order
        assert sent == list(dict.fromkeys(fds[p] for p in picks))
        assert tree.all_fds() == sent
        back = S.loads(blob, sent)
        assert back == tree
        assert S.same(back, tree)
    finally:
        for fd in fds:
            os.close(fd)


def test_fds_are_indexes_and_resolve_against_the_new_list():
    r, w = os.pipe()
    try:
        doc, fds = S.encode(Leaf(fd=S.Fd(w), data=b"", n=1))
        assert doc["fields"]["fd"] == {"$fd": 0} and fds == [w]
        back = S.decode(doc, [r])
        assert isinstance(back.fd, S.Fd) and back.fd == r
        with pytest.raises(S.SnapshotError, match="fd #0"):
            S.decode(doc, [])
    finally:
        os.close(r), os.close(w)


def test_dup_fds_gives_same_files_under_new_numbers():
    r, w = os.pipe()
    try:
        leaf = Leaf(fd=S.Fd(w), data=b"x", n=0)
        copy = S.dup_fds(leaf)
        assert copy.fd != w and S.same(copy, leaf)
        os.write(copy.fd, b"!")
        assert os.read(r, 1) == b"!"
        os.close(copy.fd)
    finally:
        os.close(r), os.close(w)


def test_older_version_is_migrated_newer_or_unknown_refused():
    doc = {"$snap": "test.tree", "version": 1, "fields": {"leaves": [], "table": {"$map": []}, "label": "old"}}
    tree = S.decode(doc, [])
    assert tree.name == "old" and tree.version == 2
    with pytest.raises(S.SnapshotVersionError, match="newer"):
        S.decode(dict(doc, version=3), [])
    with pytest.raises(S.SnapshotVersionError, match="unknown snapshot kind"):
        S.decode(dict(doc, **{"$snap": "test.nope"}), [])
    with pytest.raises(S.SnapshotVersionError):
        S.decode({"$snap": "test.leaf", "version": 0, "fields": {}}, [])


def test_malformed_documents_raise_snapshot_error():
    for bad in (b"{", b"[]", b'{"$snap": "test.leaf", "version": 1, "fields": {"n": 1}}', b'{"what": 1}'):
        with pytest.raises(S.SnapshotError):
            S.loads(bad, [])


def test_expect_and_kind_collision():
    leaf = Leaf(fd=S.Fd(0), data=b"", n=0)
    S.expect(leaf, Leaf)
    with pytest.raises(S.SnapshotError):
        S.expect(leaf, Tree)
    with pytest.raises(S.SnapshotVersionError):
        S.expect(attrs.evolve(leaf, version=7), Leaf)
    with pytest.raises(TypeError, match="test.leaf"):
        @attrs.frozen
        class Other(S.Snapshot):
            KIND = "test.leaf"
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
