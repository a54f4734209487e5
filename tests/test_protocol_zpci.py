"""Byte layouts, round trips and garbage handling of the zPCI architected formats."""

import struct

import pytest
from hypothesis import given, settings, strategies as st

from protocol.errors import ProtocolError
from protocol.zpci import formats as z


def u(bits):
    return st.integers(0, (1 << bits) - 1)


def be(data, off, size):
    return int.from_bytes(data[off:off + size], "big")


# --- strategies ---

entries = st.builds(z.ClpListEntry, u(16), u(16), st.booleans(), u(32), u(32))
list_responses = st.builds(
    z.ClpListResponse, u(16), u(64), u(32), u(16), u(8), st.just(16),
    st.lists(entries, max_size=20).map(tuple),
)
query_responses = st.builds(
    z.ClpQueryPciFnResponse, u(16), u(16), u(8), u(8), u(32),
    st.tuples(*[u(8)] * 6), u(16), st.tuples(*[u(32)] * 6), st.binary(min_size=4, max_size=4),
    u(8), u(8), u(64), u(64), u(32), st.binary(min_size=64, max_size=64),
    rid=u(16), tid=u(16), fidparm=u(8), port=u(4),
)
group_responses = st.builds(
    z.ClpQueryPciFnGrpResponse, u(16), u(12), u(8), u(8), u(13), u(16), u(8), u(64), u(64),
    maxfaal=u(16), dnoi=u(12), maxcpu=u(16),
)
fibs = st.builds(
    z.Fib, fmt=u(8), fc=u(8), pba=u(64), pal=u(64), iota=u(64), isc=u(3), noi=u(12),
    aibvo=u(6), sum=u(1), aisbo=u(6), aibv=u(64), aisb=u(64), fmb_addr=u(64), gd=u(32),
)
int_words = st.builds(z.InterruptWord, u(3), u(12), u(6), u(1), u(6))
fmbs = st.builds(z.Fmb, st.just(0), u(24), u(32), *[u(64)] * 7)
error_ccdfs = st.builds(
    z.ErrorCcdf, u(32), u(32), u(16), u(64),
    st.integers(0, 0x3F).map(lambda v: v << 2), u(8), u(12), u(4), st.booleans(), st.booleans(),
)
avail_ccdfs = st.builds(z.AvailabilityCcdf, u(32), u(32), u(16))
requests = st.one_of(
    st.builds(z.ClpListRequest, u(64)),
    st.builds(z.ClpQueryPciFnRequest, u(32)),
    st.builds(z.ClpQueryPciFnGrpRequest, u(8)),
    st.builds(z.ClpSetPciFnRequest, u(32), u(8), u(8)),
)
ROUND_TRIP = [
    (z.ClpListResponse, list_responses),
    (z.ClpQueryPciFnResponse, query_responses),
    (z.ClpQueryPciFnGrpResponse, group_responses),
    (z.ClpSetPciFnResponse, st.builds(z.ClpSetPciFnResponse, u(16), u(32))),
    (z.ClpHeader, st.builds(z.ClpHeader, u(16), u(16), u(4))),
    (z.ClpListEntry, entries),
    (z.Fib, fibs),
    (z.Fmb, fmbs),
    (z.ErrorCcdf, error_ccdfs),
    (z.AvailabilityCcdf, avail_ccdfs),
]
BYTE_DECODERS = [cls.unpack for cls, _ in ROUND_TRIP] + [
    z.ClpListRequest.unpack, z.ClpQueryPciFnRequest.unpack,
    z.ClpQueryPciFnGrpRequest.unpack, z.ClpSetPciFnRequest.unpack,
]


# --- CLP requests ---

def test_request_layouts():
    b = z.ClpSetPciFnRequest(0x80020001, z.CLP_SET_DISABLE_PCI_FN, 1).pack()
    assert len(b) == 32
    assert b[:4] == b"\x00\x20\x00\x05"
    assert be(b, 16, 4) == 0x80020001 and b[22] == 1 and b[23] == 1
    assert be(z.ClpListRequest(0x1122).pack(), 16, 8) == 0x1122
    g = z.ClpQueryPciFnGrpRequest(0xF3).pack()
    assert g[16:20] == b"\x00\x00\x00\xf3"
    assert be(z.ClpQueryPciFnRequest(0xDEAD).pack(), 16, 4) == 0xDEAD


@given(requests)
def test_request_round_trip_through_parse(req):
    parsed, rc = z.ClpRequest.parse(req.pack() + bytes(64))  # response area follows
    assert (parsed, rc) == (req, z.CLP_RC_OK)
    assert type(req).unpack(req.pack()) == req


def _mutate(block: bytes, off: int, value: bytes) -> bytes:
    return block[:off] + value + block[off + len(value):]


LIST = z.ClpListRequest(0).pack()


@pytest.mark.parametrize("block, rc", [
    (b"", z.CLP_RC_LEN),
    (LIST[:15], z.CLP_RC_LEN),
    (LIST[:31], z.CLP_RC_LEN),
    (_mutate(LIST, 0, b"\x00\x28") + bytes(8), z.CLP_RC_LEN),    # length 40
    (_mutate(LIST, 2, b"\x00\x01"), z.CLP_RC_CMD),               # store LP characteristics
    (_mutate(LIST, 2, b"\x00\x09"), z.CLP_RC_CMD),
    (_mutate(LIST, 4, b"\x10"), z.CLP_RC_FMT),                   # format nibble 1
    (_mutate(LIST, 7, b"\x01"), z.CLP_RC_RESNOT0),               # rest of the format word
    (_mutate(LIST, 15, b"\x01"), z.CLP_RC_RESNOT0),              # reserved u64 @8
    (_mutate(LIST, 31, b"\x01"), z.CLP_RC_RESNOT0),              # List reserved u64 @24
    (_mutate(z.ClpQueryPciFnRequest(1).pack(), 20, b"\x01"), z.CLP_RC_RESNOT0),
    (_mutate(z.ClpQueryPciFnGrpRequest(1).pack(), 18, b"\x01"), z.CLP_RC_RESNOT0),
    (_mutate(z.ClpSetPciFnRequest(1, 0).pack(), 21, b"\x01"), z.CLP_RC_RESNOT0),
    (_mutate(z.ClpSetPciFnRequest(1, 0).pack(), 28, b"\x01"), z.CLP_RC_RESNOT0),  # Linux GISA word
])
def test_bad_requests_earn_architected_codes(block, rc):
    assert z.ClpRequest.parse(block) == (None, rc)


def test_request_unpack_raises_clp_error_with_code():
    with pytest.raises(z.ClpError) as e:
        z.ClpQueryPciFnRequest.unpack(z.ClpSetPciFnRequest(1, 0).pack())
    assert e.value.response_code == z.CLP_RC_CMD
    assert isinstance(e.value, ProtocolError)


def test_clp_block_length_limits():
    assert z.clp_lengths_valid(32, 4064)  # what Linux sends for List PCI
    assert not z.clp_lengths_valid(32, 8168)  # sum above 8192
    assert not z.clp_lengths_valid(36, 64) and not z.clp_lengths_valid(8, 64)
    assert not z.clp_lengths_valid(32, 0) and not z.clp_lengths_valid(32, 100)
    assert z.ClpListResponse.entries_fitting(4064) == z.CLP_FH_LIST_NR_ENTRIES == 252
    assert z.ClpListResponse.entries_fitting(16) == 0


# --- CLP responses ---

def test_list_response_layout():
    e1 = z.ClpListEntry(0x1042, 0x1AF4, True, 7, 0x00020001)
    e2 = z.ClpListEntry(1, 2, False, 8, 0x00020002)
    b = z.ClpListResponse(z.CLP_RC_OK, 0, z.FH_MASK_SHM, 4096, z.CLP_LIST_UID_CHECKING,
                          entries=(e1, e2)).pack()
    assert len(b) == 64 and be(b, 0, 2) == 64 and be(b, 2, 2) == 0x10
    assert be(b, 24, 4) == 0x00FF0000 and be(b, 28, 2) == 4096 and b[30] == 1 and b[31] == 16
    assert b[32:48] == bytes.fromhex("10421af4 80000000 00000007 00020001")
    assert be(b, 52, 4) == 0  # unconfigured entry: config word zero


def test_query_pci_fn_layout():
    r = z.ClpQueryPciFnResponse(
        z.CLP_RC_OK, vfn=0x0102, flags=z.CLP_FN_UTIL_STR | z.CLP_FN_RID, pfgid=0x33,
        fid=0x11223344, bar_size=(20, 0, 12, 0, 0, 0), pchid=0x0ABC,
        bar=(0x0000000C, 0, 0x12345678, 0, 0, 0), pfip=b"\x01\x02\x03\x04", fmb_len=16, pft=5,
        sdma=0x1_0000_0000, edma=0x01FF_FFFF_FFFF_FFFF, uid=0xCAFE, util_str=z.ebcdic("ZPCID", 64),
        rid=0x0008, tid=0x0777, fidparm=0x9A, port=3,
    )
    b = r.pack()
    assert len(b) == 256 and be(b, 0, 2) == 256 and be(b, 2, 2) == z.CLP_RC_OK
    assert be(b, 16, 2) == 0x0102 and b[18] == 0x11 and b[19] == 0x33 and be(b, 20, 4) == 0x11223344
    assert list(b[24:30]) == [20, 0, 12, 0, 0, 0] and be(b, 30, 2) == 0x0ABC
    # BAR values little-endian: Linux's le32_to_cpu sees prefetch (0x8) and 64-bit (0x4).
    bar0 = struct.unpack_from("<I", b, 32)[0]
    assert b[32:36] == b"\x0c\x00\x00\x00" and bar0 & 0x8 and bar0 & 0x4
    assert b[40:44] == b"\x78\x56\x34\x12"
    assert b[56:60] == b"\x01\x02\x03\x04" and b[60] == 0x9A and b[61] == 3
    assert b[62] == 16 and b[63] == 5
    assert be(b, 64, 8) == 0x1_0000_0000 and be(b, 72, 8) == 0x01FF_FFFF_FFFF_FFFF
    assert be(b, 80, 2) == 8 and be(b, 86, 2) == 0x0777 and be(b, 124, 4) == 0xCAFE
    assert b[128:133] == bytes.fromhex("e9d7c3c9c4") and b[133:192] == b"\x40" * 59
    assert b[82:86] == bytes(4) and b[88:124] == bytes(36) and b[192:] == bytes(64)


def test_query_pci_fngrp_layout():
    r = z.ClpQueryPciFnGrpResponse(
        z.CLP_RC_OK, noi=0xABC, version=1, flags=z.CLP_FNGRP_RTR | z.CLP_FNGRP_REFRESH,
        maxstbl=0x1FFF, mui=4000, dtsm=z.ZPCI_DTSM_RTTO, dasm=0xFFFF_FFFF_FFFF_FFFF,
        msia=0xFE00_0000_0000_0000, maxfaal=0x1234, dnoi=0xFFF, maxcpu=0x0F0F,
    )
    b = r.pack()
    assert len(b) == 64 and be(b, 0, 2) == 64
    assert be(b, 16, 2) == 0x0ABC and b[18] == 1
    assert b[19] == 0x21  # RTR flag byte @19
    assert be(b, 20, 2) == 0x1FFF and be(b, 22, 2) == 4000 and b[24] == 0x40 and b[25] == 0
    assert be(b, 26, 2) == 0x1234 and be(b, 28, 2) == 0x0FFF and be(b, 30, 2) == 0x0F0F
    assert be(b, 32, 8) == (1 << 64) - 1 and be(b, 40, 8) == 0xFE00_0000_0000_0000
    assert b[48:] == bytes(16)


def test_set_pci_fn_response_layout():
    b = z.ClpSetPciFnResponse(z.CLP_RC_OK, 0x80020001).pack()
    assert b == bytes.fromhex("0020 0010 00000000 0000000000000000 80020001") + bytes(12)


@pytest.mark.parametrize("cls, gen", ROUND_TRIP, ids=lambda x: getattr(x, "__name__", ""))
@settings(max_examples=60)
@given(data=st.data())
def test_round_trip(cls, gen, data):
    obj = data.draw(gen)
    packed = obj.pack()
    assert cls.unpack(packed) == obj
    assert cls.unpack(packed + b"\xff" * 8) == obj  # trailing bytes are not ours


@given(int_words)
def test_interrupt_word_round_trip(iw):
    word = iw.pack()
    assert 0 <= word <= 0xFFFFFFFF and z.InterruptWord.reserved_bits(word) == 0
    assert z.InterruptWord.unpack(word) == iw


def test_response_reserved_fields_rejected():
    good = z.ClpSetPciFnResponse(z.CLP_RC_OK, 1).pack()
    with pytest.raises(ProtocolError):
        z.ClpSetPciFnResponse.unpack(_mutate(good, 24, b"\x01"))
    grp = z.ClpQueryPciFnGrpResponse(z.CLP_RC_OK, 1, 0, 0, 128, 0, 0, 0, 0).pack()
    with pytest.raises(ProtocolError):
        z.ClpQueryPciFnGrpResponse.unpack(_mutate(grp, 16, b"\x10"))  # above the 12-bit noi
    lst = z.ClpListResponse(z.CLP_RC_OK, entries=(z.ClpListEntry(1, 2, True, 3, 4),)).pack()
    with pytest.raises(ProtocolError):
        z.ClpListResponse.unpack(_mutate(lst, 31, b"\x20"))  # entry size 32
    with pytest.raises(ProtocolError):
        z.ClpListResponse.unpack(_mutate(lst, 0, b"\x00\x38"))  # 56: not 32 + 16n
    with pytest.raises(ProtocolError):
        z.ClpListResponse.unpack(_mutate(lst, 39, b"\x01"))  # config word reserved bit


# --- FIB and interrupt word ---

def test_interrupt_word_bit_positions():
    assert z.InterruptWord(isc=7).pack() == 0x70000000
    assert z.InterruptWord(noi=0xFFF).pack() == 0x0FFF0000
    assert z.InterruptWord(aibvo=0x3F).pack() == 0x00003F00
    assert z.InterruptWord(sum=1).pack() == 0x00000080
    assert z.InterruptWord(aisbo=0x3F).pack() == 0x0000003F
    assert z.InterruptWord.reserved_bits(0xFFFFFFFF) == 0x8000C040
    # Reserved bits do not leak into the fields.
    assert z.InterruptWord.unpack(0xFFFFFFFF) == z.InterruptWord(7, 0xFFF, 0x3F, 1, 0x3F)
    assert z.InterruptWord.unpack(0x8000C040) == z.InterruptWord()


def test_fib_layout():
    f = z.Fib(fmt=0, fc=z.ZPCI_FIB_FC_ENABLED | z.ZPCI_FIB_FC_DMAAS_REG, pba=0x1_0000_0000,
              pal=0x1_FFFF_FFFF, iota=0x1234_5804, isc=2, noi=64, aibvo=0, sum=1, aisbo=5,
              aibv=0xA000, aisb=0xB000, fmb_addr=0xC000, gd=0xDEADBEEF)
    b = f.pack()
    assert len(b) == z.ZPCI_FIB_LEN
    assert b[0] == 0 and b[8] == 0x90 and b[1:8] == bytes(7) and b[9:16] == bytes(7)
    assert be(b, 16, 8) == 0x1_0000_0000 and be(b, 24, 8) == 0x1_FFFF_FFFF
    assert be(b, 32, 8) == 0x1234_5804
    assert be(b, z.ZPCI_FIB_OFF_INT_WORD, 4) == 0x20400085 and be(b, 44, 4) == 0
    assert be(b, 48, 8) == 0xA000 and be(b, 56, 8) == 0xB000 and be(b, 64, 8) == 0xC000
    assert be(b, 72, 4) == 0 and be(b, 76, 4) == 0xDEADBEEF
    assert f.interrupt_word == z.InterruptWord(2, 64, 0, 1, 5)


def test_fib_reserved_fields_reported_not_raised():
    b = z.Fib(pba=0x1000).pack()
    assert z.Fib.reserved_fields(b) == ()
    dirty = _mutate(_mutate(_mutate(b, 3, b"\x01"), 40, b"\x80"), 47, b"\x01")
    assert z.Fib.reserved_fields(dirty) == ("@1", "@40 interrupt word", "@44")
    assert z.Fib.unpack(dirty) == z.Fib(pba=0x1000)


# --- FMB and CCDFs ---

def test_fmb_offsets():
    f = z.Fmb(format_indicators=z.ZPCI_FMB_DMA_COUNTER_VALID, samples=3, last_update=4,
              ld_ops=5, st_ops=6, stb_ops=7, rpcit_ops=8, dma_rbytes=9, dma_wbytes=10)
    b = f.pack()
    assert len(b) == z.ZPCI_FMB_FMT0_LEN == z.ZPCI_FMB_FMT0_WORDS * 4
    assert b[z.ZPCI_FMB_OFF_FORMAT] == 0 and b[1:4] == b"\x80\x00\x00"
    for off, value in [(z.ZPCI_FMB_OFF_LAST_UPDATE, 4), (z.ZPCI_FMB_OFF_LD_OPS, 5),
                       (z.ZPCI_FMB_OFF_ST_OPS, 6), (z.ZPCI_FMB_OFF_STB_OPS, 7),
                       (z.ZPCI_FMB_OFF_RPCIT_OPS, 8), (z.ZPCI_FMB_OFF_DMA_RBYTES, 9),
                       (z.ZPCI_FMB_OFF_DMA_WBYTES, 10)]:
        assert be(b, off, 8) == value
    assert be(b, z.ZPCI_FMB_OFF_SAMPLES, 4) == 3


def test_ccdf_layouts():
    e = z.ErrorCcdf(fh=0x80020001, fid=9, pec=z.ZPCI_PEC_TABLE_TYPE, faddr=0x1234_5000,
                    dmaas=1, vector=0x7FF, expected_table_type=0xC, event_qualifier=True, write=True)
    b = e.pack()
    assert len(b) == 32 and be(b, 0, 4) == 0 and be(b, 4, 4) == 0x80020001 and be(b, 8, 4) == 9
    assert be(b, 12, 4) == 0xC7FF0103
    assert be(b, 16, 8) == 0x1234_5000 and b[24:30] == bytes(6) and be(b, 30, 2) == 0x09
    a = z.AvailabilityCcdf(0x00020001, 9, z.ZPCI_PEC_AVAIL_DECONFIG_REQUESTED).pack()
    assert a == bytes.fromhex("00000000 00020001 00000009") + bytes(18) + b"\x03\x03"


def test_ebcdic_helpers():
    assert z.ebcdic("A1 z", 6) == bytes.fromhex("c1f140a94040")
    assert z.from_ebcdic(z.ebcdic("virtio blk", 64)) == "virtio blk"
    assert z.from_ebcdic(bytes.fromhex("c1c2") + bytes(62)) == "AB"  # NUL padding too
    with pytest.raises(ValueError):
        z.ebcdic("x" * 65, 64)


# --- garbage ---

@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_error(data):
    for decode in BYTE_DECODERS + [z.Fib.reserved_fields]:
        try:
            decode(data)
        except ProtocolError:
            pass
    req, rc = z.ClpRequest.parse(data)
    assert (req is None) == (rc != z.CLP_RC_OK)
    assert rc in (z.CLP_RC_OK, z.CLP_RC_LEN, z.CLP_RC_CMD, z.CLP_RC_FMT, z.CLP_RC_RESNOT0)


@settings(max_examples=200)
@given(st.sampled_from([1, 2, 3, 4, 5]), st.binary(min_size=28, max_size=28))
def test_random_request_bodies_never_crash(cmd, tail):
    block = struct.pack(">HH", 32, cmd) + tail
    req, rc = z.ClpRequest.parse(block)
    if rc == z.CLP_RC_OK:
        assert req.pack() == block  # only a fully clean block is accepted
    else:
        assert req is None


@given(st.one_of(st.integers(), st.none(), st.booleans(), st.text(max_size=3)))
def test_interrupt_word_garbage(value):
    valid = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 32
    if valid:
        assert z.InterruptWord.unpack(value).pack() == value & ~z.ZPCI_FIB_INT_RESERVED_MASK
    else:
        with pytest.raises(ProtocolError):
            z.InterruptWord.unpack(value)
