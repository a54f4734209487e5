"""CLP blocks: header, requests, responses; EBCDIC utility strings."""

from __future__ import annotations

import codecs
import struct
from typing import ClassVar

import attrs

from protocol.errors import ProtocolError
from protocol.zpci._fields import _flag, _ints, _nbytes, _need, _u
from protocol.zpci.consts import (
    CLP_FHLIST_MASK_CONFIG, CLP_HDR_LEN, CLP_LIST_ENTRY_LEN, CLP_LIST_PCI, CLP_MASK_FMT,
    CLP_PFIP_NR_SEGMENTS, CLP_QUERY_PCI_FN, CLP_QUERY_PCI_FNGRP, CLP_QUERY_PCI_FNGRP_RSP_LEN,
    CLP_QUERY_PCI_FN_RSP_LEN, CLP_RC_CMD, CLP_RC_FMT, CLP_RC_LEN, CLP_RC_OK, CLP_RC_RESNOT0,
    CLP_REQ_LEN, CLP_REQ_MAX_LEN, CLP_REQ_MIN_LEN, CLP_REQ_QPCIG_MASK_PFGID,
    CLP_REQ_RSP_MAX_LEN, CLP_RSP_MAX_LEN, CLP_RSP_MIN_LEN, CLP_RSP_QPCIG_MASK_DNOI,
    CLP_RSP_QPCIG_MASK_MAXSTBL, CLP_RSP_QPCIG_MASK_NOI, CLP_SET_PCI_FN, CLP_SET_PCI_FN_RSP_LEN,
    CLP_UTIL_STR_LEN, LIST_PCI_HDR_LEN, PCI_BAR_COUNT,
)

EBCDIC_CODEC = "cp500"
EBCDIC_SPACE = 0x40


class ClpError(ProtocolError):
    """A CLP request the architecture answers with ``response_code``."""

    def __init__(self, message: str, response_code: int):
        super().__init__(message)
        self.response_code = response_code


def ebcdic(text: str, length: int) -> bytes:
    """Encode ``text`` as EBCDIC (cp500) padded with EBCDIC blanks to ``length`` bytes."""
    raw = codecs.encode(text, EBCDIC_CODEC)
    if len(raw) > length:
        raise ValueError(f"{text!r} does not fit in {length} EBCDIC bytes")
    return raw + bytes([EBCDIC_SPACE]) * (length - len(raw))


def from_ebcdic(data: bytes) -> str:
    """Decode EBCDIC (cp500) bytes, dropping trailing blanks and NULs."""
    return codecs.decode(bytes(data), EBCDIC_CODEC).rstrip(" \x00")


def clp_lengths_valid(req_len: int, rsp_len: int) -> bool:
    """True if the CLP request/response lengths pass QEMU's operand-exception checks."""
    return (
        CLP_REQ_MIN_LEN <= req_len <= CLP_REQ_MAX_LEN
        and req_len % 8 == 0
        and CLP_RSP_MIN_LEN <= rsp_len <= CLP_RSP_MAX_LEN
        and rsp_len % 8 == 0
        and req_len + rsp_len <= CLP_REQ_RSP_MAX_LEN
    )


# --- CLP header ---

_CLP_HDR = struct.Struct(">HHIQ")


@attrs.frozen
class ClpHeader:
    """16-byte CLP header; ``code`` is the command (request) or response code."""

    length: int = attrs.field(validator=_u(16))
    code: int = attrs.field(validator=_u(16))
    fmt: int = attrs.field(default=0, validator=_u(4))

    def pack(self) -> bytes:
        return _CLP_HDR.pack(self.length, self.code, self.fmt << 28, 0)

    @classmethod
    def unpack(cls, data) -> ClpHeader:
        if len(data) < CLP_HDR_LEN:
            raise ClpError(f"CLP header: {len(data)} bytes, need {CLP_HDR_LEN}", CLP_RC_LEN)
        length, code, word, reserved = _CLP_HDR.unpack_from(data)
        if word & ~CLP_MASK_FMT or reserved:
            raise ClpError("CLP header: reserved field not zero", CLP_RC_RESNOT0)
        return cls(length, code, word >> 28)


def _peek_header(data) -> tuple[int, int, int, int]:
    """(length, code, format word, reserved u64) without validation."""
    if len(data) < CLP_HDR_LEN:
        raise ClpError(f"CLP header: {len(data)} bytes, need {CLP_HDR_LEN}", CLP_RC_LEN)
    return _CLP_HDR.unpack_from(data)


# --- CLP requests ---

class _ClpRequestBase:
    COMMAND: ClassVar[int]
    _BODY: ClassVar[struct.Struct]

    def _body(self) -> tuple:
        raise NotImplementedError

    def pack(self) -> bytes:
        return ClpHeader(CLP_REQ_LEN, self.COMMAND).pack() + self._BODY.pack(*self._body())

    @classmethod
    def unpack(cls, data):
        """Decode a request block; ``ClpError.response_code`` says how to answer a bad one."""
        length, code, word, reserved = _peek_header(data)
        # Order follows QEMU: length, command, format, reserved fields.
        if length != CLP_REQ_LEN:
            raise ClpError(f"CLP request length {length}, must be {CLP_REQ_LEN}", CLP_RC_LEN)
        if len(data) < CLP_REQ_LEN:
            raise ClpError(f"CLP request block truncated to {len(data)} bytes", CLP_RC_LEN)
        if code != cls.COMMAND:
            raise ClpError(f"CLP command {code:#06x} is not {cls.COMMAND:#06x}", CLP_RC_CMD)
        if word & CLP_MASK_FMT:
            raise ClpError(f"CLP request format {word >> 28} not supported", CLP_RC_FMT)
        if word & ~CLP_MASK_FMT or reserved:
            raise ClpError("CLP request header: reserved field not zero", CLP_RC_RESNOT0)
        return cls._from_body(cls._BODY.unpack_from(data, CLP_HDR_LEN))

    @classmethod
    def _from_body(cls, fields: tuple):
        raise NotImplementedError


def _resnot0(what: str) -> ClpError:
    return ClpError(f"{what}: reserved field not zero", CLP_RC_RESNOT0)


@attrs.frozen
class ClpListRequest(_ClpRequestBase):
    """List PCI Functions request (resume token 0 starts the list)."""

    COMMAND: ClassVar[int] = CLP_LIST_PCI
    _BODY: ClassVar[struct.Struct] = struct.Struct(">QQ")

    resume_token: int = attrs.field(default=0, validator=_u(64))

    def _body(self):
        return (self.resume_token, 0)

    @classmethod
    def _from_body(cls, fields):
        token, reserved = fields
        if reserved:
            raise _resnot0("List PCI request")
        return cls(token)


@attrs.frozen
class ClpQueryPciFnRequest(_ClpRequestBase):
    """Query PCI Function request."""

    COMMAND: ClassVar[int] = CLP_QUERY_PCI_FN
    _BODY: ClassVar[struct.Struct] = struct.Struct(">IIQ")

    fh: int = attrs.field(validator=_u(32))

    def _body(self):
        return (self.fh, 0, 0)

    @classmethod
    def _from_body(cls, fields):
        fh, r1, r2 = fields
        if r1 or r2:
            raise _resnot0("Query PCI Function request")
        return cls(fh)


@attrs.frozen
class ClpQueryPciFnGrpRequest(_ClpRequestBase):
    """Query PCI Function Group request."""

    COMMAND: ClassVar[int] = CLP_QUERY_PCI_FNGRP
    _BODY: ClassVar[struct.Struct] = struct.Struct(">IIQ")

    pfgid: int = attrs.field(validator=_u(8))

    def _body(self):
        return (self.pfgid, 0, 0)

    @classmethod
    def _from_body(cls, fields):
        word, r1, r2 = fields
        if word & ~CLP_REQ_QPCIG_MASK_PFGID or r1 or r2:
            raise _resnot0("Query PCI Function Group request")
        return cls(word & CLP_REQ_QPCIG_MASK_PFGID)


@attrs.frozen
class ClpSetPciFnRequest(_ClpRequestBase):
    """Set PCI Function request (enable/disable, MIO on/off)."""

    COMMAND: ClassVar[int] = CLP_SET_PCI_FN
    _BODY: ClassVar[struct.Struct] = struct.Struct(">IHBBQ")

    fh: int = attrs.field(validator=_u(32))
    oc: int = attrs.field(validator=_u(8))
    ndas: int = attrs.field(default=1, validator=_u(8))

    def _body(self):
        return (self.fh, 0, self.oc, self.ndas, 0)

    @classmethod
    def _from_body(cls, fields):
        fh, r1, oc, ndas, r2 = fields
        # r2 covers Linux's host-only GISA word @28 too; guests send 0.
        if r1 or r2:
            raise _resnot0("Set PCI Function request")
        return cls(fh, oc, ndas)


ClpRequestType = ClpListRequest | ClpQueryPciFnRequest | ClpQueryPciFnGrpRequest | ClpSetPciFnRequest

_REQUESTS: dict[int, type] = {
    CLP_LIST_PCI: ClpListRequest,
    CLP_QUERY_PCI_FN: ClpQueryPciFnRequest,
    CLP_QUERY_PCI_FNGRP: ClpQueryPciFnGrpRequest,
    CLP_SET_PCI_FN: ClpSetPciFnRequest,
}


class ClpRequest:
    """Entry point for guest CLP request blocks."""

    @staticmethod
    def parse(block) -> tuple[ClpRequestType | None, int]:
        """Decode a request; return ``(request, CLP_RC_OK)`` or ``(None, architected code)``."""
        try:
            length, code, _, _ = _peek_header(block)
            if length != CLP_REQ_LEN or len(block) < CLP_REQ_LEN:
                return None, CLP_RC_LEN
            cls = _REQUESTS.get(code)
            if cls is None:
                return None, CLP_RC_CMD
            return cls.unpack(block), CLP_RC_OK
        except ClpError as e:
            return None, e.response_code


def _resp_header(data, min_len: int, what: str) -> ClpHeader:
    _need(data, min_len, what)
    try:
        return ClpHeader.unpack(data)
    except ClpError as e:
        raise ProtocolError(f"{what}: {e}") from None


# --- List PCI Functions response ---

_LIST_ENTRY = struct.Struct(">HHIII")
_LIST_RSP = struct.Struct(">QIHBB")


@attrs.frozen
class ClpListEntry:
    """One 16-byte function-handle list entry."""

    device_id: int = attrs.field(validator=_u(16))
    vendor_id: int = attrs.field(validator=_u(16))
    configured: bool = attrs.field(validator=_flag)
    fid: int = attrs.field(validator=_u(32))
    fh: int = attrs.field(validator=_u(32))

    def pack(self) -> bytes:
        config = CLP_FHLIST_MASK_CONFIG if self.configured else 0
        return _LIST_ENTRY.pack(self.device_id, self.vendor_id, config, self.fid, self.fh)

    @classmethod
    def unpack(cls, data) -> ClpListEntry:
        _need(data, CLP_LIST_ENTRY_LEN, "CLP list entry")
        device_id, vendor_id, config, fid, fh = _LIST_ENTRY.unpack_from(data)
        if config & ~CLP_FHLIST_MASK_CONFIG:
            raise ProtocolError("CLP list entry: reserved bits set in the config word")
        return cls(device_id, vendor_id, bool(config), fid, fh)


def _entries(value) -> tuple:
    return tuple(value)


@attrs.frozen
class ClpListResponse:
    """List PCI Functions response; header length = 32 + 16 * entries."""

    response_code: int = attrs.field(validator=_u(16))
    resume_token: int = attrs.field(default=0, validator=_u(64))
    mdd: int = attrs.field(default=0, validator=_u(32))
    max_fn: int = attrs.field(default=0, validator=_u(16))
    flags: int = attrs.field(default=0, validator=_u(8))
    entry_size: int = attrs.field(default=CLP_LIST_ENTRY_LEN, validator=_u(8))
    entries: tuple[ClpListEntry, ...] = attrs.field(default=(), converter=_entries)

    @entries.validator
    def _check_entries(self, attribute, value):
        if not all(isinstance(e, ClpListEntry) for e in value):
            raise ValueError("entries must be ClpListEntry")
        if LIST_PCI_HDR_LEN + CLP_LIST_ENTRY_LEN * len(value) > CLP_RSP_MAX_LEN:
            raise ValueError(f"{len(value)} entries do not fit a CLP response")

    @staticmethod
    def entries_fitting(rsp_len: int) -> int:
        """How many entries a response area of ``rsp_len`` bytes holds."""
        return max(0, (rsp_len - LIST_PCI_HDR_LEN) // CLP_LIST_ENTRY_LEN)

    def pack(self) -> bytes:
        length = LIST_PCI_HDR_LEN + CLP_LIST_ENTRY_LEN * len(self.entries)
        head = ClpHeader(length, self.response_code).pack() + _LIST_RSP.pack(
            self.resume_token, self.mdd, self.max_fn, self.flags, self.entry_size
        )
        return head + b"".join(e.pack() for e in self.entries)

    @classmethod
    def unpack(cls, data) -> ClpListResponse:
        hdr = _resp_header(data, LIST_PCI_HDR_LEN, "List PCI response")
        token, mdd, max_fn, flags, entry_size = _LIST_RSP.unpack_from(data, CLP_HDR_LEN)
        if entry_size != CLP_LIST_ENTRY_LEN:
            raise ProtocolError(f"List PCI response: entry size {entry_size}, expected 16")
        n, rem = divmod(hdr.length - LIST_PCI_HDR_LEN, CLP_LIST_ENTRY_LEN)
        if hdr.length < LIST_PCI_HDR_LEN or rem:
            raise ProtocolError(f"List PCI response: bad length {hdr.length}")
        _need(data, hdr.length, "List PCI response")
        entries = tuple(
            ClpListEntry.unpack(data[LIST_PCI_HDR_LEN + i * 16 : LIST_PCI_HDR_LEN + (i + 1) * 16])
            for i in range(n)
        )
        return cls(hdr.code, token, mdd, max_fn, flags, entry_size, entries)


# --- Query PCI Function response (256 bytes) ---

_QPCI_A = struct.Struct(">HBBI6sH")  # @16..31
_QPCI_BARS = struct.Struct("<6I")  # @32..55, little-endian (module docstring)
_QPCI_B = struct.Struct(">4sBBBBQQH4sH36sI64s64s")  # @56..255


def _bytes(value) -> bytes:
    return bytes(value)


def _tuple(value) -> tuple:
    return tuple(value)


@attrs.frozen
class ClpQueryPciFnResponse:
    """Query PCI Function response, Linux layout up to @256 (no MIO block)."""

    response_code: int = attrs.field(validator=_u(16))
    vfn: int = attrs.field(validator=_u(16))
    flags: int = attrs.field(validator=_u(8))
    pfgid: int = attrs.field(validator=_u(8))
    fid: int = attrs.field(validator=_u(32))
    bar_size: tuple[int, ...] = attrs.field(converter=_tuple, validator=_ints(PCI_BAR_COUNT, 8))
    pchid: int = attrs.field(validator=_u(16))
    bar: tuple[int, ...] = attrs.field(converter=_tuple, validator=_ints(PCI_BAR_COUNT, 32))
    pfip: bytes = attrs.field(converter=_bytes, validator=_nbytes(CLP_PFIP_NR_SEGMENTS))
    fmb_len: int = attrs.field(validator=_u(8))
    pft: int = attrs.field(validator=_u(8))
    sdma: int = attrs.field(validator=_u(64))
    edma: int = attrs.field(validator=_u(64))
    uid: int = attrs.field(validator=_u(32))
    util_str: bytes = attrs.field(converter=_bytes, validator=_nbytes(CLP_UTIL_STR_LEN))
    rid: int = attrs.field(default=0, validator=_u(16))
    tid: int = attrs.field(default=0, validator=_u(16))
    fidparm: int = attrs.field(default=0, validator=_u(8))
    port: int = attrs.field(default=0, validator=_u(4))

    def pack(self) -> bytes:
        return b"".join((
            ClpHeader(CLP_QUERY_PCI_FN_RSP_LEN, self.response_code).pack(),
            _QPCI_A.pack(self.vfn, self.flags, self.pfgid, self.fid, bytes(self.bar_size), self.pchid),
            _QPCI_BARS.pack(*self.bar),
            _QPCI_B.pack(
                self.pfip, self.fidparm, self.port, self.fmb_len, self.pft, self.sdma, self.edma,
                self.rid, bytes(4), self.tid, bytes(36), self.uid, self.util_str, bytes(64),
            ),
        ))

    @classmethod
    def unpack(cls, data) -> ClpQueryPciFnResponse:
        hdr = _resp_header(data, CLP_QUERY_PCI_FN_RSP_LEN, "Query PCI Function response")
        vfn, flags, pfgid, fid, bar_size, pchid = _QPCI_A.unpack_from(data, 16)
        bar = _QPCI_BARS.unpack_from(data, 32)
        (pfip, fidparm, port_byte, fmb_len, pft, sdma, edma, rid, r0, tid, r1, uid, util_str,
         r2) = _QPCI_B.unpack_from(data, 56)
        if port_byte & 0xF0 or any(r0) or any(r1) or any(r2):
            raise ProtocolError("Query PCI Function response: reserved field not zero")
        return cls(
            hdr.code, vfn, flags, pfgid, fid, tuple(bar_size), pchid, bar, pfip, fmb_len, pft,
            sdma, edma, uid, util_str, rid, tid, fidparm, port_byte & 0x0F,
        )


# --- Query PCI Function Group response (64 bytes) ---

_QPCIG = struct.Struct(">HBBHHBBHHHQQ16s")  # @16..63


@attrs.frozen
class ClpQueryPciFnGrpResponse:
    """Query PCI Function Group response."""

    response_code: int = attrs.field(validator=_u(16))
    noi: int = attrs.field(validator=_u(12))
    version: int = attrs.field(validator=_u(8))
    flags: int = attrs.field(validator=_u(8))
    maxstbl: int = attrs.field(validator=_u(13))
    mui: int = attrs.field(validator=_u(16))
    dtsm: int = attrs.field(validator=_u(8))
    dasm: int = attrs.field(validator=_u(64))
    msia: int = attrs.field(validator=_u(64))
    maxfaal: int = attrs.field(default=0, validator=_u(16))
    dnoi: int = attrs.field(default=0, validator=_u(12))
    maxcpu: int = attrs.field(default=0, validator=_u(16))

    def pack(self) -> bytes:
        return ClpHeader(CLP_QUERY_PCI_FNGRP_RSP_LEN, self.response_code).pack() + _QPCIG.pack(
            self.noi, self.version, self.flags, self.maxstbl, self.mui, self.dtsm, 0,
            self.maxfaal, self.dnoi, self.maxcpu, self.dasm, self.msia, bytes(16),
        )

    @classmethod
    def unpack(cls, data) -> ClpQueryPciFnGrpResponse:
        hdr = _resp_header(data, CLP_QUERY_PCI_FNGRP_RSP_LEN, "Query PCI Function Group response")
        (noi, version, flags, maxstbl, mui, dtsm, r0, maxfaal, dnoi, maxcpu, dasm, msia,
         r1) = _QPCIG.unpack_from(data, 16)
        if (noi & ~CLP_RSP_QPCIG_MASK_NOI or maxstbl & ~CLP_RSP_QPCIG_MASK_MAXSTBL
                or dnoi & ~CLP_RSP_QPCIG_MASK_DNOI or r0 or any(r1)):
            raise ProtocolError("Query PCI Function Group response: reserved field not zero")
        return cls(hdr.code, noi, version, flags, maxstbl, mui, dtsm, dasm, msia, maxfaal, dnoi, maxcpu)


# --- Set PCI Function response (32 bytes) ---

_SETPCI_RSP = struct.Struct(">IIQ")


@attrs.frozen
class ClpSetPciFnResponse:
    """Set PCI Function response carrying the new function handle."""

    response_code: int = attrs.field(validator=_u(16))
    fh: int = attrs.field(default=0, validator=_u(32))

    def pack(self) -> bytes:
        return ClpHeader(CLP_SET_PCI_FN_RSP_LEN, self.response_code).pack() + _SETPCI_RSP.pack(self.fh, 0, 0)

    @classmethod
    def unpack(cls, data) -> ClpSetPciFnResponse:
        hdr = _resp_header(data, CLP_SET_PCI_FN_RSP_LEN, "Set PCI Function response")
        fh, r1, r2 = _SETPCI_RSP.unpack_from(data, 16)
        if r1 or r2:
            raise ProtocolError("Set PCI Function response: reserved field not zero")
        return cls(hdr.code, fh)
