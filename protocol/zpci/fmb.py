"""The function measurement block, format 0."""

from __future__ import annotations

import struct

import attrs

from protocol.errors import ProtocolError
from protocol.zpci._fields import _need, _u
from protocol.zpci.consts import ZPCI_FMB_FMT0_LEN

# --- FMB format 0 ---

_FMB0 = struct.Struct(">IIQQQQQQQ")


@attrs.frozen
class Fmb:
    """Function Measurement Block, format 0 (64 bytes)."""

    fmt: int = attrs.field(default=0, validator=_u(8))
    format_indicators: int = attrs.field(default=0, validator=_u(24))
    samples: int = attrs.field(default=0, validator=_u(32))
    last_update: int = attrs.field(default=0, validator=_u(64))
    ld_ops: int = attrs.field(default=0, validator=_u(64))
    st_ops: int = attrs.field(default=0, validator=_u(64))
    stb_ops: int = attrs.field(default=0, validator=_u(64))
    rpcit_ops: int = attrs.field(default=0, validator=_u(64))
    dma_rbytes: int = attrs.field(default=0, validator=_u(64))
    dma_wbytes: int = attrs.field(default=0, validator=_u(64))

    def pack(self) -> bytes:
        return _FMB0.pack(
            (self.fmt << 24) | self.format_indicators, self.samples, self.last_update,
            self.ld_ops, self.st_ops, self.stb_ops, self.rpcit_ops, self.dma_rbytes, self.dma_wbytes,
        )

    @classmethod
    def unpack(cls, data) -> Fmb:
        _need(data, ZPCI_FMB_FMT0_LEN, "FMB")
        word, *rest = _FMB0.unpack_from(data)
        if word >> 24:
            raise ProtocolError(f"FMB format {word >> 24} is not format 0")
        return cls(0, word & 0xFFFFFF, *rest)
