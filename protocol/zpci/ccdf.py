"""Content codes of error and availability events (CCDFs)."""

from __future__ import annotations

import struct

import attrs

from protocol.errors import ProtocolError
from protocol.zpci._fields import _flag, _need, _u
from protocol.zpci.consts import ZPCI_CCDF_LEN, ZPCI_CCDF_QUAL_NAMED_MASK

# --- CCDFs ---

_CCDF_ERR = struct.Struct(">IIIIQIHH")
_CCDF_AVAIL = struct.Struct(">III18sH")


@attrs.frozen
class ErrorCcdf:
    """Error-event CCDF (32 bytes); ``qualifier`` holds qualifier-word bits not named here."""

    fh: int = attrs.field(validator=_u(32))
    fid: int = attrs.field(validator=_u(32))
    pec: int = attrs.field(validator=_u(16))
    faddr: int = attrs.field(default=0, validator=_u(64))
    qualifier: int = attrs.field(default=0, validator=_u(32))
    dmaas: int = attrs.field(default=0, validator=_u(8))
    vector: int = attrs.field(default=0, validator=_u(12))
    expected_table_type: int = attrs.field(default=0, validator=_u(4))
    event_qualifier: bool = attrs.field(default=False, validator=_flag)
    write: bool = attrs.field(default=False, validator=_flag)

    @property
    def qualifier_word(self) -> int:
        return (self.qualifier | (self.expected_table_type << 28) | (self.vector << 16)
                | (self.dmaas << 8) | (int(self.event_qualifier) << 1) | int(self.write))

    def pack(self) -> bytes:
        return _CCDF_ERR.pack(0, self.fh, self.fid, self.qualifier_word, self.faddr, 0, 0, self.pec)

    @classmethod
    def unpack(cls, data) -> ErrorCcdf:
        _need(data, ZPCI_CCDF_LEN, "error CCDF")
        r0, fh, fid, q, faddr, r1, r2, pec = _CCDF_ERR.unpack_from(data)
        if r0 or r1 or r2:
            raise ProtocolError("error CCDF: reserved field not zero")
        return cls(fh, fid, pec, faddr, q & ~ZPCI_CCDF_QUAL_NAMED_MASK & 0xFFFFFFFF,
                   (q >> 8) & 0xFF, (q >> 16) & 0xFFF, q >> 28, bool(q & 2), bool(q & 1))


@attrs.frozen
class AvailabilityCcdf:
    """Availability-event CCDF (32 bytes)."""

    fh: int = attrs.field(validator=_u(32))
    fid: int = attrs.field(validator=_u(32))
    pec: int = attrs.field(validator=_u(16))

    def pack(self) -> bytes:
        return _CCDF_AVAIL.pack(0, self.fh, self.fid, bytes(18), self.pec)

    @classmethod
    def unpack(cls, data) -> AvailabilityCcdf:
        _need(data, ZPCI_CCDF_LEN, "availability CCDF")
        r0, fh, fid, r1, pec = _CCDF_AVAIL.unpack_from(data)
        if r0 or any(r1):
            raise ProtocolError("availability CCDF: reserved field not zero")
        return cls(fh, fid, pec)
