"""A small common base for layer snapshots (capture state, rebuild it elsewhere).

Every stateful layer offers ``snapshot() -> <Layer>Snapshot`` and
``restore(snap)``.  A snapshot is an attrs value object:

* ``version`` — the layout version of that layer's snapshot; ``restore`` refuses
  a version it does not know (``SnapshotError``) instead of guessing;
* plain data only (ints, bytes, tuples, nested snapshots) so it compares with
  ``==`` and can be serialised;
* file descriptors are never inside the data: a layer that needs some (guest
  memory, eventfds) lists them in ``fds`` in a fixed order and refers to them
  by index, so a transport (SCM_RIGHTS) can carry them next to the bytes.

The round-trip rule every layer's test checks: snapshot -> restore into a
fresh object -> identical behaviour and an identical snapshot.
"""

from __future__ import annotations

import attrs


class SnapshotError(ValueError):
    """A snapshot that cannot be restored (unknown version, inconsistent data)."""


@attrs.frozen
class Snapshot:
    """Base of the layer snapshots: a layout version and the fds it needs."""

    # keyword-only, so a layer's own fields may come without defaults
    version: int = attrs.field(kw_only=True)
    fds: tuple[int, ...] = attrs.field(default=(), kw_only=True)

    def check_version(self, *known: int) -> None:
        if self.version not in known:
            raise SnapshotError(f"{type(self).__name__} version {self.version} not supported "
                                f"(known: {', '.join(map(str, known))})")
