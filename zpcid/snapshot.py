"""Captured state of one layer, and its JSON-safe encoding with the fds apart.

Every stateful layer offers ``snapshot() -> SomethingSnapshot`` and
``restore(snap)``: the snapshot is a frozen attrs class derived from
:class:`Snapshot`, carrying a ``version`` and holding only plain values
(int, str, bool, None, bytes, tuples, dicts, nested snapshots) and :class:`Fd`
for the file descriptors the state lives in (DMA-map files, eventfds, memfds).

``encode`` turns a snapshot into a JSON-safe document plus the list of fds it
needs (each ``Fd`` becomes an index into that list), so the document can travel
as bytes and the fds beside it (SCM_RIGHTS, inherited fds, the systemd fd
store); ``decode`` turns both back into the snapshot.  A snapshot of an older
version is upgraded by its class's ``migrate``; one newer than the code, or of a
kind the code does not know, raises :class:`SnapshotVersionError`.

Fds are borrowed: a snapshot does not own the fds in it, and ``restore`` takes
ownership of the fds it is given (the caller duplicates them if the source
object lives on, e.g. in round-trip tests).  A layer may instead keep plain
indexes into an fd list it is handed beside the snapshot (``restore(snap, fds)``,
checked with ``Snapshot.check``); both forms encode the same way.
"""

from __future__ import annotations

import base64
import errno as _errno
import json
import os
from typing import Any, ClassVar, Iterator

import attrs


class SnapshotError(ValueError):
    """A snapshot that cannot be restored here (unknown version, missing fd, wrong shape)."""

    def __init__(self, message: str, errno: int = _errno.EINVAL):
        super().__init__(message)
        self.errno = errno


class SnapshotVersionError(SnapshotError):
    """A snapshot this code cannot understand: newer version or unknown kind."""


class Fd(int):
    """A file descriptor inside a snapshot (an int, tagged so ``encode`` finds it)."""

    def __repr__(self) -> str:
        return f"Fd({int(self)})"


_KINDS: dict[str, type["Snapshot"]] = {}


def _current_version(self: "Snapshot") -> int:
    return type(self).VERSION


@attrs.frozen
class Snapshot:
    """Base of every layer snapshot.

    Subclasses set ``KIND`` (a stable name, never reused) and ``VERSION``
    (bumped on any change of their fields) and, once they have had more than
    one version, override ``migrate`` to lift older field sets.
    """

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    version: int = attrs.field(
        kw_only=True, default=attrs.Factory(_current_version, takes_self=True))

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        kind = cls.__dict__.get("KIND")
        if kind:
            other = _KINDS.get(kind)
            # attrs rebuilds the class it decorates; the rebuilt one replaces
            # the original under the same qualified name.
            if other is not None and other.__qualname__ != cls.__qualname__:
                raise TypeError(f"snapshot kind {kind!r} used by {other.__qualname__} and {cls.__qualname__}")
            _KINDS[kind] = cls

    @classmethod
    def migrate(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        """Lift ``fields`` of an older ``version`` to the current one."""
        if version == cls.VERSION:
            return fields
        raise SnapshotVersionError(
            f"{cls.KIND} snapshot version {version} cannot be restored (this code has {cls.VERSION})")

    def all_fds(self) -> list[int]:
        """The distinct fds this snapshot (and the ones nested in it) needs, in order."""
        return _unique(_walk_fds(self))

    def close_fds(self) -> None:
        """Close every fd in this snapshot (a restore that copied what it needed)."""
        for fd in self.all_fds():
            try:
                os.close(fd)
            except OSError:
                pass

    def check(self, fds: list[int] | tuple[int, ...] = (), needed: int = 0) -> None:
        """Refuse a snapshot of another version, or one restored without its fds."""
        self.check_version()
        if len(fds) < needed:
            raise SnapshotError(f"{type(self).__name__} needs {needed} fds, got {len(fds)}")

    def as_dict(self) -> dict:
        """Plain nested dicts (for showing a snapshot; ``encode`` is for moving one)."""
        return attrs.asdict(self, recurse=True)

    def check_version(self, *known: int) -> None:
        """Raise unless this snapshot is of the current version (or one of ``known``)."""
        if self.version not in (known or (self.VERSION,)):
            raise SnapshotVersionError(f"{type(self).__name__} version {self.version} "
                                       f"(this build restores version {self.VERSION})")


def kinds() -> dict[str, type[Snapshot]]:
    """Every snapshot kind this process knows (imported modules only)."""
    return dict(_KINDS)


def expect(snap: Any, cls: type[Snapshot]) -> None:
    """Raise SnapshotError unless ``snap`` is a current-version ``cls`` snapshot."""
    if not isinstance(snap, cls):
        raise SnapshotError(f"expected a {cls.KIND} snapshot, got {type(snap).__name__}")
    snap.check_version()


def require(cond: bool, message: str) -> None:
    """Raise SnapshotError(message) unless ``cond``: a snapshot that does not fit its target."""
    if not cond:
        raise SnapshotError(message)


# --------------------------------------------------------------------------- walking
def _walk_fds(value: Any) -> Iterator[int]:
    if isinstance(value, Fd):
        yield int(value)
    elif isinstance(value, Snapshot):
        for a in attrs.fields(type(value)):
            yield from _walk_fds(getattr(value, a.name))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _walk_fds(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_fds(k)
            yield from _walk_fds(v)


def _unique(fds: Iterator[int]) -> list[int]:
    return list(dict.fromkeys(fds))


# --------------------------------------------------------------------------- encoding
def encode(snap: Snapshot) -> tuple[dict[str, Any], list[int]]:
    """A JSON-safe document for ``snap`` and the fds it refers to by index."""
    fds: list[int] = []
    index: dict[int, int] = {}

    def enc(v: Any) -> Any:
        if isinstance(v, Fd):
            i = index.get(int(v))
            if i is None:
                i = index[int(v)] = len(fds)
                fds.append(int(v))
            return {"$fd": i}
        if isinstance(v, Snapshot):
            return {"$snap": v.KIND, "version": v.version,
                    "fields": {a.name: enc(getattr(v, a.name))
                               for a in attrs.fields(type(v)) if a.name != "version"}}
        if isinstance(v, (bytes, bytearray, memoryview)):
            return {"$b64": base64.b64encode(bytes(v)).decode("ascii")}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            return {"$map": [[enc(k), enc(x)] for k, x in v.items()]}
        if v is None or isinstance(v, (bool, int, str, float)):
            return int(v) if isinstance(v, int) and not isinstance(v, bool) else v
        raise SnapshotError(f"cannot encode {type(v).__name__} in a snapshot")

    if not isinstance(snap, Snapshot):
        raise SnapshotError(f"not a snapshot: {type(snap).__name__}")
    return enc(snap), fds


def decode(doc: Any, fds: list[int]) -> Snapshot:
    """The snapshot ``doc`` describes, with fd indexes resolved against ``fds``."""

    def dec(v: Any) -> Any:
        if isinstance(v, list):
            return tuple(dec(x) for x in v)
        if not isinstance(v, dict):
            return v
        if "$fd" in v:
            i = v["$fd"]
            if not isinstance(i, int) or not 0 <= i < len(fds):
                raise SnapshotError(f"snapshot names fd #{i} but {len(fds)} were passed")
            return Fd(fds[i])
        if "$b64" in v:
            return base64.b64decode(v["$b64"])
        if "$map" in v:
            return {_hashable(dec(k)): dec(x) for k, x in v["$map"]}
        if "$snap" in v:
            kind, version = v["$snap"], v.get("version")
            cls = _KINDS.get(kind)
            if cls is None:
                raise SnapshotVersionError(f"unknown snapshot kind {kind!r}")
            if not isinstance(version, int) or version > cls.VERSION or version < 1:
                raise SnapshotVersionError(
                    f"{kind} snapshot version {version!r} is newer than this code ({cls.VERSION})")
            raw = v.get("fields")
            if not isinstance(raw, dict):
                raise SnapshotError(f"{kind} snapshot without fields")
            fields = cls.migrate({k: dec(x) for k, x in raw.items()}, version)
            try:
                return cls(**fields)
            except (TypeError, ValueError) as exc:
                raise SnapshotError(f"{kind} snapshot does not fit its class: {exc}") from None
        raise SnapshotError(f"unrecognised snapshot object with keys {sorted(v)[:4]}")

    snap = dec(doc)
    if not isinstance(snap, Snapshot):
        raise SnapshotError("snapshot document does not hold a snapshot")
    return snap


def _hashable(k: Any) -> Any:
    return k if not isinstance(k, list) else tuple(k)


def dumps(snap: Snapshot) -> tuple[bytes, list[int]]:
    """``encode`` as UTF-8 JSON bytes."""
    doc, fds = encode(snap)
    return json.dumps(doc, separators=(",", ":")).encode(), fds


def loads(data: bytes, fds: list[int]) -> Snapshot:
    """Inverse of ``dumps``."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"snapshot is not valid JSON: {exc}") from None
    return decode(doc, fds)


def dup_fds(snap: Snapshot) -> Snapshot:
    """The same snapshot with every fd duplicated (close-on-exec): for restoring a
    copy while the source object keeps its own fds."""
    doc, fds = encode(snap)
    new: list[int] = []
    try:
        for fd in fds:
            new.append(os.dup(fd))
    except OSError:
        for fd in new:
            os.close(fd)
        raise
    return decode(doc, new)


def same(a: Snapshot, b: Snapshot) -> bool:
    """Identical state: equal documents and each fd naming the same file."""
    da, fa = encode(a)
    db, fb = encode(b)
    if da != db or len(fa) != len(fb):
        return False
    return all(_file_id(x) == _file_id(y) for x, y in zip(fa, fb))


def _file_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
