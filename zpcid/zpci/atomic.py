"""Atomic OR on guest memory for adapter-interrupt indicator bits.

The guest clears AIBV/AISB bits from its vCPUs (other OS threads of the VMM,
not Python threads) while zpcid sets them, so the OR must be a real atomic
read-modify-write on the shared mapping. CPython has no such primitive;
libatomic's ``__atomic_fetch_or_1`` is one. Without it zpcid refuses to start:
a plain read-modify-write would silently lose interrupts.
"""

from __future__ import annotations

import ctypes

LIBATOMIC = "libatomic.so.1"
LIBATOMIC_PACKAGE = "libatomic1"  # the Debian/Ubuntu package that ships it
_SEQ_CST = 5  # __ATOMIC_SEQ_CST


class LibatomicMissing(RuntimeError):
    """libatomic cannot be loaded: indicator bits cannot be set atomically."""


def load_fetch_or(soname: str = LIBATOMIC):
    """``__atomic_fetch_or_1`` from ``soname``, or LibatomicMissing naming the package."""
    try:
        fn = ctypes.CDLL(soname).__atomic_fetch_or_1
    except (OSError, AttributeError) as exc:
        raise LibatomicMissing(
            f"zpcid needs {soname} (__atomic_fetch_or_1) to set adapter-interrupt indicator "
            f"bits atomically against guest vCPUs: {exc}; install it, on Debian/Ubuntu with "
            f"`apt-get install {LIBATOMIC_PACKAGE}`") from None
    fn.restype = ctypes.c_uint8
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_int]
    return fn


_FETCH_OR = load_fetch_or()


def set_indicator_bit(address: int, bit: int) -> bool:
    """Atomically set MSB-first bit ``bit`` of the byte at process ``address``; True if it was clear."""
    mask = 0x80 >> bit
    return not _FETCH_OR(address, mask, _SEQ_CST) & mask
