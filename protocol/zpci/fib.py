"""The function information block (MPCIFC/STPCIFC) and its interrupt word."""

from __future__ import annotations

import struct

import attrs

from protocol.errors import ProtocolError
from protocol.zpci._fields import _flag, _need, _u
from protocol.zpci.consts import ZPCI_FIB_INT_RESERVED_MASK, ZPCI_FIB_LEN

# --- FIB interrupt word and FIB ---

@attrs.frozen
class InterruptWord:
    """FIB format-0 adapter-interruption word at @40."""

    isc: int = attrs.field(default=0, validator=_u(3))
    noi: int = attrs.field(default=0, validator=_u(12))
    aibvo: int = attrs.field(default=0, validator=_u(6))
    sum: int = attrs.field(default=0, validator=_flag)
    aisbo: int = attrs.field(default=0, validator=_u(6))

    def pack(self) -> int:
        return (self.isc << 28) | (self.noi << 16) | (self.aibvo << 8) | (int(self.sum) << 7) | self.aisbo

    @classmethod
    def unpack(cls, word: int) -> InterruptWord:
        """Decode a 32-bit word; reserved bits are ignored (see ``reserved_bits``)."""
        if isinstance(word, bool) or not isinstance(word, int) or not 0 <= word <= 0xFFFFFFFF:
            raise ProtocolError(f"interrupt word {word!r} is not a 32-bit value")
        return cls((word >> 28) & 0x7, (word >> 16) & 0xFFF, (word >> 8) & 0x3F, (word >> 7) & 1, word & 0x3F)

    @staticmethod
    def reserved_bits(word: int) -> int:
        """The reserved bits (31, 15-14, 6) set in ``word``; 0 if clean."""
        return word & ZPCI_FIB_INT_RESERVED_MASK


_FIB = struct.Struct(">B7sB7sQQQIIQQQII")


@attrs.frozen
class Fib:
    """80-byte Function Information Block (format 0 interrupt fields)."""

    fmt: int = attrs.field(default=0, validator=_u(8))
    fc: int = attrs.field(default=0, validator=_u(8))
    pba: int = attrs.field(default=0, validator=_u(64))
    pal: int = attrs.field(default=0, validator=_u(64))
    iota: int = attrs.field(default=0, validator=_u(64))
    isc: int = attrs.field(default=0, validator=_u(3))
    noi: int = attrs.field(default=0, validator=_u(12))
    aibvo: int = attrs.field(default=0, validator=_u(6))
    sum: int = attrs.field(default=0, validator=_flag)
    aisbo: int = attrs.field(default=0, validator=_u(6))
    aibv: int = attrs.field(default=0, validator=_u(64))
    aisb: int = attrs.field(default=0, validator=_u(64))
    fmb_addr: int = attrs.field(default=0, validator=_u(64))
    gd: int = attrs.field(default=0, validator=_u(32))

    @property
    def interrupt_word(self) -> InterruptWord:
        return InterruptWord(self.isc, self.noi, self.aibvo, self.sum, self.aisbo)

    def pack(self) -> bytes:
        return _FIB.pack(
            self.fmt, bytes(7), self.fc, bytes(7), self.pba, self.pal, self.iota,
            self.interrupt_word.pack(), 0, self.aibv, self.aisb, self.fmb_addr, 0, self.gd,
        )

    @classmethod
    def unpack(cls, data) -> Fib:
        """Decode a FIB; reserved fields are ignored (see ``reserved_fields``)."""
        _need(data, ZPCI_FIB_LEN, "FIB")
        (fmt, _, fc, _, pba, pal, iota, word, _, aibv, aisb, fmb_addr, _, gd) = _FIB.unpack_from(data)
        iw = InterruptWord.unpack(word)
        return cls(fmt, fc, pba, pal, iota, iw.isc, iw.noi, iw.aibvo, iw.sum, iw.aisbo,
                   aibv, aisb, fmb_addr, gd)

    @staticmethod
    def reserved_fields(data) -> tuple[str, ...]:
        """Names of format-0 reserved FIB fields that are nonzero in ``data``."""
        _need(data, ZPCI_FIB_LEN, "FIB")
        (_, r1, _, r2, _, _, _, word, r3, _, _, _, r4, _) = _FIB.unpack_from(data)
        checks = (
            ("@1", any(r1)),
            ("@9", any(r2)),
            ("@40 interrupt word", InterruptWord.reserved_bits(word)),
            ("@44", r3),
            ("@72", r4),
        )
        return tuple(name for name, bad in checks if bad)
