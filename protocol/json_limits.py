"""JSON from a peer, parsed only within a size and nesting bound.

``json.loads`` recurses once per nesting level: a document nested a few
hundred deep raises RecursionError (or worse, in a deep call stack) instead of
a ValueError.  Both the vfio-user VERSION capabilities and the control socket
parse peer JSON through ``loads``, so that rule exists once.
"""

from __future__ import annotations

import json
import re
from typing import Any

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: C speed on long strings
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonLimitError(ValueError):
    """The document is too large or nested too deeply (a ValueError, like bad JSON)."""


def _check_structure(data: bytes, max_depth: int, max_containers: int) -> None:
    # Only the brackets outside strings matter (found at C speed); the Python
    # loop over them is bounded by max_containers.
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if len(brackets) > 2 * max_containers:
        raise JsonLimitError(f"JSON with more than {max_containers} arrays and objects")
    depth = 0
    for b in brackets:
        depth += 1 if b in b"[{" else -1
        if depth > max_depth:
            raise JsonLimitError(f"JSON nested deeper than {max_depth} levels")


def loads(data: bytes | str, *, max_size: int, max_depth: int, max_containers: int = 4096) -> Any:
    """``json.loads`` that raises JsonLimitError beyond ``max_size`` bytes, ``max_depth``
    levels of nesting or ``max_containers`` arrays and objects."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if len(raw) > max_size:
        raise JsonLimitError(f"JSON document of {len(raw)} bytes exceeds the limit of {max_size}")
    _check_structure(raw, max_depth, max_containers)
    try:
        return json.loads(raw)
    except RecursionError:  # cannot happen within max_depth; kept as a last line
        raise JsonLimitError("JSON nested too deeply") from None
