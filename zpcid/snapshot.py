"""The common shape of captured state: versioned attrs snapshots and the fds they need.

Every stateful layer offers ``snapshot() -> XSnapshot`` and ``restore(snap, fds)``.
A snapshot is a frozen attrs class deriving from ``Snapshot``: plain values only
(ints, bytes, strings, tuples, nested snapshots), so it can be compared, copied and
serialised. File descriptors cannot travel inside it; the layer lists the ones it
needs in ``fds`` (what it holds now, in a fixed order) and the snapshot refers to
them by their index in that list. Whoever moves the snapshot to another process
passes those fds alongside (SCM_RIGHTS) and hands ``restore`` the received list.
"""

from __future__ import annotations

from typing import ClassVar

import attrs


class SnapshotError(ValueError):
    """A snapshot that cannot be restored here (unknown version, missing fd, wrong shape)."""


@attrs.frozen
class Snapshot:
    """Base of every layer's snapshot; ``VERSION`` is bumped on any incompatible change."""

    VERSION: ClassVar[int] = 1

    version: int = attrs.field(kw_only=True)

    def check(self, fds: list[int] | tuple[int, ...] = (), needed: int = 0) -> None:
        """Refuse a snapshot of another version, or one restored without its fds."""
        if self.version != self.VERSION:
            raise SnapshotError(f"{type(self).__name__} version {self.version} "
                                f"(this build restores version {self.VERSION})")
        if len(fds) < needed:
            raise SnapshotError(f"{type(self).__name__} needs {needed} fds, got {len(fds)}")

    def as_dict(self) -> dict:
        """Plain nested dicts (for JSON and for showing a snapshot)."""
        return attrs.asdict(self, recurse=True)
