"""Codecs of every vfio-user payload: round trips, and garbage only ever raises ProtocolError."""

import errno
import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from protocol.vfio_user import consts as C
from protocol.vfio_user import messages as M
from protocol.errors import ProtocolError
from protocol.vfio_user.header import HEADER_SIZE, Flags, Header, error_reply, pack_header, validate_flags

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U64 = st.integers(0, (1 << 64) - 1)
ANSWERABLE = {errno.EINVAL, errno.ENOTSUP, errno.E2BIG}

SETTINGS = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------- header


@SETTINGS
@given(U16, U16, U32, U32, U32)
def test_header_round_trip(msg_id, cmd, size, flags, err):
    h = Header(msg_id, cmd, size, flags, err)
    assert len(h.pack()) == HEADER_SIZE
    assert Header.unpack(h.pack()) == h


@SETTINGS
@given(st.binary(max_size=HEADER_SIZE - 1))
def test_truncated_header_is_fatal(data):
    with pytest.raises(ProtocolError) as ei:
        Header.unpack(data)
    assert ei.value.fatal


def test_error_reply_is_header_only():
    h = Header.unpack(error_reply(7, 3, errno.EEXIST))
    assert (h.msg_id, h.cmd, h.msg_size, h.error_no) == (7, 3, HEADER_SIZE, errno.EEXIST)
    assert h.is_reply and h.is_error and not h.no_reply


def test_pack_header_counts_the_header():
    h = Header.unpack(pack_header(0x12345, 9, 10, Flags.NO_REPLY))
    assert h.msg_size == HEADER_SIZE + 10 and h.msg_id == 0x2345 and h.no_reply


@SETTINGS
@given(U32)
def test_validate_flags(flags):
    ok = flags & ~0x3F == 0 and flags & 0xF in (0, 1)
    if ok:
        validate_flags(flags)
    else:
        with pytest.raises(ProtocolError) as ei:
            validate_flags(flags)
        assert ei.value.errno == errno.EINVAL


# --------------------------------------------------------------------------- strategies

small_int = st.integers(0, 1 << 20)
capabilities = st.builds(
    M.Capabilities,
    max_msg_fds=st.integers(0, 1024),
    max_data_xfer_size=st.integers(1, 0xFFFFFFFF),
    max_dma_maps=U32,
    pgsizes=st.integers(1, (1 << 64) - 1),
    write_multiple=st.booleans(),
    migration=st.none() | st.dictionaries(st.sampled_from(["pgsize", "max_bitmap_size"]), small_int),
)
versions = st.builds(M.Version, U16, U16, capabilities)


def _ranges(cls, flag_bits):
    return st.integers(0, (1 << 64) - 1).flatmap(
        lambda addr: st.builds(
            cls, argsz=st.integers(cls.SIZE, 0xFFFFFFFF), flags=flag_bits,
            **({"offset": U64} if cls is M.DmaMap else {}),
            addr=st.just(addr), size=st.integers(1, min((1 << 64) - 1, (1 << 64) - addr)),
        )
    )


dma_maps = _ranges(M.DmaMap, st.integers(0, 3))
dma_unmaps = _ranges(M.DmaUnmap, st.just(0)) | st.builds(
    M.DmaUnmap, argsz=st.integers(24, 0xFFFFFFFF), flags=st.just(C.VFIO_DMA_UNMAP_FLAG_ALL),
    addr=st.just(0), size=st.just(0),
)
sparse_caps = st.builds(M.SparseMmapCap, st.lists(st.tuples(U64, U64), max_size=4).map(tuple))
type_caps = st.builds(M.TypeCap, U32, U32)
region_infos = st.builds(
    M.RegionInfo, argsz=st.just(0), flags=st.integers(0, 7), index=U32, cap_offset=st.just(0),
    size=U64, offset=U64, caps=st.lists(sparse_caps | type_caps, max_size=3).map(tuple),
)


@st.composite
def irq_sets(draw):
    dt = draw(st.sampled_from([C.VFIO_IRQ_SET_DATA_NONE, C.VFIO_IRQ_SET_DATA_BOOL,
                               C.VFIO_IRQ_SET_DATA_EVENTFD]))
    act = draw(st.sampled_from([C.VFIO_IRQ_SET_ACTION_MASK, C.VFIO_IRQ_SET_ACTION_UNMASK,
                                C.VFIO_IRQ_SET_ACTION_TRIGGER]))
    count = draw(st.integers(0, 64))
    start = draw(st.integers(0, 0xFFFFFFFF - count))
    data = draw(st.binary(min_size=count, max_size=count)) if dt == C.VFIO_IRQ_SET_DATA_BOOL else b""
    return M.IrqSet(draw(st.integers(20, 0xFFFFFFFF)), dt | act, draw(st.integers(0, 8)),
                    start, count, data)


@st.composite
def region_accesses(draw, with_data):
    data = draw(st.binary(max_size=64)) if with_data else b""
    count = len(data) if with_data else draw(U32)
    return M.RegionAccess(draw(U64), draw(U32), count, data)


@st.composite
def dma_accesses(draw, with_data):
    data = draw(st.binary(max_size=64)) if with_data else b""
    count = len(data) if with_data else draw(U64)
    return M.DmaAccess(draw(U64), count, data)


write_multis = st.builds(
    M.RegionWriteMulti,
    st.lists(
        st.binary(min_size=1, max_size=8).flatmap(
            lambda d: st.builds(M.WriteMultiEntry, U64, U32, st.just(len(d)), st.just(d))
        ),
        max_size=10,
    ).map(tuple),
)


@st.composite
def features(draw):
    ops = draw(st.sampled_from([C.VFIO_DEVICE_FEATURE_GET, C.VFIO_DEVICE_FEATURE_SET,
                                C.VFIO_DEVICE_FEATURE_PROBE,
                                C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_PROBE,
                                C.VFIO_DEVICE_FEATURE_SET | C.VFIO_DEVICE_FEATURE_PROBE,
                                C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET
                                | C.VFIO_DEVICE_FEATURE_PROBE]))
    return M.DeviceFeature(draw(U32), ops | draw(U16), draw(st.binary(max_size=32)))


# --------------------------------------------------------------------------- round trips

SIMPLE = [
    (dma_maps, M.DmaMap.unpack),
    (dma_unmaps, M.DmaUnmap.unpack),
    (st.builds(M.DeviceInfo, st.integers(16, 0xFFFFFFFF), U32, U32, U32), M.DeviceInfo.unpack),
    (st.builds(M.RegionIoFds, st.integers(16, 0xFFFFFFFF), st.just(0), U32, st.just(0)),
     M.RegionIoFds.unpack),
    (st.builds(M.IrqInfo, st.integers(16, 0xFFFFFFFF), U32, U32, U32), M.IrqInfo.unpack),
    (irq_sets(), M.IrqSet.unpack),
    (region_accesses(True), lambda p: M.RegionAccess.unpack(p, with_data=True)),
    (region_accesses(False), lambda p: M.RegionAccess.unpack(p, with_data=False)),
    (dma_accesses(True), lambda p: M.DmaAccess.unpack(p, with_data=True)),
    (dma_accesses(False), lambda p: M.DmaAccess.unpack(p, with_data=False)),
    (write_multis, M.RegionWriteMulti.unpack),
    (features(), M.DeviceFeature.unpack),
]


@pytest.mark.parametrize("strategy,unpack", SIMPLE, ids=lambda x: getattr(x, "__qualname__", ""))
@SETTINGS
@given(data=st.data())
def test_round_trip(strategy, unpack, data):
    msg = data.draw(strategy)
    assert unpack(msg.pack()) == msg


@SETTINGS
@given(versions)
def test_version_round_trip(v):
    back = M.Version.unpack(v.pack())
    assert back == v
    # The server reply must stay parseable by QEMU: NUL-terminated JSON.
    assert v.pack().endswith(b"\0")


def test_version_without_json():
    v = M.Version.unpack(struct.pack("<HH", 0, 3))
    assert (v.major, v.minor, v.has_json) == (0, 3, False)
    assert v.capabilities == M.Capabilities()
    assert M.Version(0, 3, has_json=False).pack() == struct.pack("<HH", 0, 3)


def test_version_as_qemu_sends_it():
    from vfio_raw import QEMU_VERSION_PAYLOAD

    assert HEADER_SIZE + len(QEMU_VERSION_PAYLOAD) == 214
    v = M.Version.unpack(QEMU_VERSION_PAYLOAD)
    assert (v.major, v.minor) == (0, 0)
    caps = v.capabilities
    assert (caps.max_msg_fds, caps.max_data_xfer_size, caps.pgsizes, caps.max_dma_maps) == (
        16, 1 << 20, 4096, 65535)
    assert caps.write_multiple and caps.migration == {"max_bitmap_size": 268435456, "pgsize": 4096}


def test_version_include_limits_keys():
    v = M.Version(0, 0, M.Capabilities(max_msg_fds=4))
    doc = json.loads(v.pack(include=("max_msg_fds",))[4:-1])
    assert doc == {"capabilities": {"max_msg_fds": 4}}


@SETTINGS
@given(region_infos)
def test_region_info_reply_round_trip(info):
    full_payload, fits = info.pack_reply(1 << 32)
    back = M.RegionInfo.unpack_reply(full_payload)
    assert back.argsz == len(full_payload)
    assert back.caps == info.caps and fits == bool(info.caps)
    assert (back.index, back.size, back.offset) == (info.index, info.size, info.offset)
    if info.caps:
        assert back.flags == info.flags | C.VFIO_REGION_INFO_FLAG_CAPS and back.cap_offset == 32
    else:
        assert back.flags == info.flags and back.cap_offset == 0


@SETTINGS
@given(region_infos, st.integers(32, 200))
def test_region_info_reply_respects_argsz(info, argsz):
    payload, fits = info.pack_reply(argsz)
    back = M.RegionInfo.unpack_reply(payload)
    if not fits:
        # Only the fixed part; argsz still tells the client how much to ask for.
        assert len(payload) == 32 and back.caps == () and back.cap_offset == 0
        assert not back.flags & C.VFIO_REGION_INFO_FLAG_CAPS
    assert len(payload) <= max(argsz, 32)


@SETTINGS
@given(st.integers(32, 0xFFFFFFFF), U32)
def test_region_info_request_round_trip(argsz, index):
    req = M.RegionInfo(argsz=argsz, index=index)
    assert M.RegionInfo.unpack_request(req.pack_request()) == req


# --------------------------------------------------------------------------- bad input

UNPACKERS = {
    "version": M.Version.unpack,
    "dma_map": M.DmaMap.unpack,
    "dma_unmap": M.DmaUnmap.unpack,
    "dma_read_reply": lambda p: M.DmaAccess.unpack(p, with_data=True),
    "dma_write_reply": lambda p: M.DmaAccess.unpack(p, with_data=False),
    "device_info": M.DeviceInfo.unpack,
    "region_info_req": M.RegionInfo.unpack_request,
    "region_info_reply": M.RegionInfo.unpack_reply,
    "region_io_fds": M.RegionIoFds.unpack,
    "irq_info": M.IrqInfo.unpack,
    "irq_set": M.IrqSet.unpack,
    "region_read": lambda p: M.RegionAccess.unpack(p, with_data=False),
    "region_write": lambda p: M.RegionAccess.unpack(p, with_data=True),
    "write_multi": M.RegionWriteMulti.unpack,
    "feature": M.DeviceFeature.unpack,
}


@pytest.mark.parametrize("name", sorted(UNPACKERS))
@SETTINGS
@given(payload=st.binary(max_size=300))
def test_garbage_raises_only_protocol_error(name, payload):
    try:
        UNPACKERS[name](payload)
    except ProtocolError as exc:
        assert exc.errno in ANSWERABLE
        assert not exc.fatal  # a bad payload never loses the framing


FIXED = [
    (dma_maps, M.DmaMap.unpack),
    (dma_unmaps, M.DmaUnmap.unpack),
    (st.builds(M.DeviceInfo, st.integers(16, 0xFFFFFFFF)), M.DeviceInfo.unpack),
    (st.builds(M.IrqInfo, st.integers(16, 0xFFFFFFFF)), M.IrqInfo.unpack),
    (irq_sets(), M.IrqSet.unpack),
    (region_accesses(True), lambda p: M.RegionAccess.unpack(p, with_data=True)),
    (region_accesses(False), lambda p: M.RegionAccess.unpack(p, with_data=False)),
    (dma_accesses(True), lambda p: M.DmaAccess.unpack(p, with_data=True)),
    (write_multis, M.RegionWriteMulti.unpack),
    (versions, M.Version.unpack),
]


@pytest.mark.parametrize("strategy,unpack", FIXED)
@SETTINGS
@given(data=st.data())
def test_truncated_payload_is_einval(strategy, unpack, data):
    packed = data.draw(strategy).pack()
    cut = data.draw(st.integers(0, len(packed) - 1))
    if unpack == M.Version.unpack and cut == 4:
        return  # a bare major/minor is a valid VERSION without JSON
    with pytest.raises(ProtocolError) as ei:
        unpack(packed[:cut])
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("payload", [
    struct.pack("<IIQQQ", 31, 3, 0, 0, 4096),                 # argsz too small
    struct.pack("<IIQQQ", 32, 4, 0, 0, 4096),                 # unknown flag
    struct.pack("<IIQQQ", 32, 3, 0, 0, 0),                    # empty
    struct.pack("<IIQQQ", 32, 3, 0, (1 << 64) - 4096, 8192),  # wraps
])
def test_dma_map_rejects(payload):
    with pytest.raises(ProtocolError) as ei:
        M.DmaMap.unpack(payload)
    assert ei.value.errno == errno.EINVAL


@pytest.mark.parametrize("payload,err", [
    (struct.pack("<IIQQ", 24, 1, 0, 4096), errno.ENOTSUP),    # dirty bitmap
    (struct.pack("<IIQQ", 24, 4, 0, 4096), errno.EINVAL),
    (struct.pack("<IIQQ", 24, 2, 0, 4096), errno.EINVAL),     # unmap-all with a range
    (struct.pack("<IIQQ", 24, 0, 0, 0), errno.EINVAL),
    (struct.pack("<IIQQ", 23, 0, 0, 4096), errno.EINVAL),     # argsz cannot hold the echo
])
def test_dma_unmap_rejects(payload, err):
    with pytest.raises(ProtocolError) as ei:
        M.DmaUnmap.unpack(payload)
    assert ei.value.errno == err


@pytest.mark.parametrize("flags,data", [
    (C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_DATA_BOOL | C.VFIO_IRQ_SET_ACTION_TRIGGER, b""),
    (C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_MASK | C.VFIO_IRQ_SET_ACTION_UNMASK, b""),
    (C.VFIO_IRQ_SET_DATA_NONE, b""),
    (C.VFIO_IRQ_SET_DATA_BOOL | C.VFIO_IRQ_SET_ACTION_TRIGGER, b"\1"),        # 1 bool for count 2
    (C.VFIO_IRQ_SET_DATA_EVENTFD | C.VFIO_IRQ_SET_ACTION_TRIGGER, b"\0" * 8),  # fds are in-band
    (0x40 | C.VFIO_IRQ_SET_DATA_NONE | C.VFIO_IRQ_SET_ACTION_TRIGGER, b""),
])
def test_irq_set_rejects(flags, data):
    with pytest.raises(ProtocolError):
        M.IrqSet.unpack(struct.pack("<IIIII", 20 + len(data), flags, 2, 0, 2) + data)


def test_irq_set_accepts_qemu_argsz_20_for_eventfds():
    req = M.IrqSet.unpack(struct.pack("<IIIII", 20, C.VFIO_IRQ_SET_DATA_EVENTFD
                                      | C.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 4))
    assert req.count == 4 and req.data_type == C.VFIO_IRQ_SET_DATA_EVENTFD


@pytest.mark.parametrize("payload", [
    b"\0\0\0\0{}",                      # no NUL
    b"\0\0\0\0{}\0{}\0",                # embedded NUL
    b"\0\0\0\0[]\0",                    # not an object
    b"\0\0\0\0{\"capabilities\": 3}\0",
    b"\0\0\0\0\xff\xfe\0",              # not UTF-8
    b"\0\0\0\0{\"capabilities\": {\"max_msg_fds\": true}}\0",
    b"\0\0\0\0{\"capabilities\": {\"max_msg_fds\": 4096}}\0",
    b"\0\0\0\0{\"capabilities\": {\"max_data_xfer_size\": 0}}\0",
    b"\0\0\0\0{\"capabilities\": {\"write_multiple\": 1}}\0",
    b"\0\0\0\0{\"capabilities\": {\"migration\": {\"pgsize\": \"4k\"}}}\0",
    b"\0\0\0\0{\"capabilities\": {\"twin_socket\": {\"supported\": 1}}}\0",
    b"\0\0\0\0" + b"[" * 200_000 + b"]" * 200_000 + b"\0",   # nesting deeper than the parser's stack
    b"\0\0\0\0{\"capabilities\": {\"pgsizes\": " + b"9" * 5000 + b"}}\0",
])
def test_version_rejects(payload):
    with pytest.raises(ProtocolError) as ei:
        M.Version.unpack(payload)
    assert ei.value.errno == errno.EINVAL


def test_version_keeps_unknown_capabilities():
    v = M.Version.unpack(b"\0\0\1\0" + json.dumps({"capabilities": {"future": [1]}}).encode() + b"\0")
    assert v.minor == 1 and v.capabilities.extra == {"future": [1]}


def test_region_info_reply_caps_chain_loop_is_rejected():
    head = struct.pack("<IIIIQQ", 48, C.VFIO_REGION_INFO_FLAG_CAPS, 0, 32, 4096, 0)
    cap = struct.pack("<HHI", C.VFIO_REGION_INFO_CAP_TYPE, 1, 32) + struct.pack("<II", 1, 2)
    with pytest.raises(ProtocolError):
        M.RegionInfo.unpack_reply(head + cap)


def test_region_info_reply_sparse_count_beyond_payload():
    head = struct.pack("<IIIIQQ", 48, C.VFIO_REGION_INFO_FLAG_CAPS, 0, 32, 4096, 0)
    cap = struct.pack("<HHI", C.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + struct.pack("<II", 1 << 30, 0)
    with pytest.raises(ProtocolError):
        M.RegionInfo.unpack_reply(head + cap)


def test_write_multi_limits():
    with pytest.raises(ProtocolError):
        M.RegionWriteMulti.unpack(struct.pack("<Q", 1 << 40))
    bad_count = struct.pack("<Q", 1) + struct.pack("<QII8s", 0, 0, 9, b"")
    with pytest.raises(ProtocolError):
        M.RegionWriteMulti.unpack(bad_count)


@pytest.mark.parametrize("flags", [
    0,                                                        # no operation
    C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET,    # both without PROBE
    C.VFIO_DEVICE_FEATURE_GET | (1 << 19),                    # reserved bit
])
def test_feature_rejects(flags):
    with pytest.raises(ProtocolError):
        M.DeviceFeature.unpack(struct.pack("<II", 8, flags))


def test_region_io_fds_rejects_flags_and_count():
    for payload in (struct.pack("<IIII", 16, 1, 0, 0), struct.pack("<IIII", 16, 0, 0, 1),
                    struct.pack("<IIII", 8, 0, 0, 0)):
        with pytest.raises(ProtocolError):
            M.RegionIoFds.unpack(payload)
