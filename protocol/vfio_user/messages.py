"""Typed payloads of every vfio-user command and reply, with pack/unpack.

Each ``unpack`` validates lengths and reserved fields and raises
``ProtocolError`` carrying the errno to answer with.  Payload offsets are
relative to the end of the 16-byte header.
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any, ClassVar

import attrs

from protocol.vfio_user import consts as C
from protocol.errors import ProtocolError
from protocol import json_limits

# Bounds on the VERSION capabilities document (a few hundred bytes, three levels
# deep, in every client known).
VERSION_JSON_MAX_SIZE = 64 << 10
VERSION_JSON_MAX_DEPTH = 16

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise ProtocolError(f"{what}: payload {len(payload)} bytes, need {size}")


def _exact(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what}: payload {len(payload)} bytes, expected {size}")


# --------------------------------------------------------------------------- VERSION


@attrs.frozen(slots=True)
class Capabilities:
    """The ``capabilities`` object of VERSION; defaults are the protocol's."""

    max_msg_fds: int = C.DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = C.DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = C.DEFAULT_MAX_DMA_MAPS
    pgsizes: int = C.DEFAULT_PGSIZES
    write_multiple: bool = False
    migration: dict[str, int] | None = None
    twin_socket: dict[str, Any] | None = None
    extra: dict[str, Any] = attrs.field(factory=dict)

    def to_json_obj(self, *, include: tuple[str, ...] | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "max_msg_fds": self.max_msg_fds,
            "max_data_xfer_size": self.max_data_xfer_size,
            "pgsizes": self.pgsizes,
            "max_dma_maps": self.max_dma_maps,
        }
        if self.write_multiple:
            obj["write_multiple"] = True
        if self.migration is not None:
            obj["migration"] = dict(self.migration)
        if self.twin_socket is not None:
            obj["twin_socket"] = dict(self.twin_socket)
        if include is not None:
            obj = {k: v for k, v in obj.items() if k in include}
        return obj

    @classmethod
    def from_json_obj(cls, caps: Any) -> "Capabilities":
        if not isinstance(caps, dict):
            raise ProtocolError("VERSION: 'capabilities' is not an object")

        def integer(key: str, default: int, lo: int, hi: int) -> int:
            v = caps.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ProtocolError(f"VERSION: capability {key!r} must be an integer")
            if not lo <= v <= hi:
                raise ProtocolError(f"VERSION: capability {key!r}={v} outside [{lo}, {hi}]")
            return v

        wm = caps.get("write_multiple", False)
        if not isinstance(wm, bool):
            raise ProtocolError("VERSION: capability 'write_multiple' must be a boolean")
        mig = caps.get("migration")
        if mig is not None:
            if not isinstance(mig, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in mig.values()
            ):
                raise ProtocolError("VERSION: capability 'migration' must be an object of integers")
        twin = caps.get("twin_socket")
        if twin is not None:
            if not isinstance(twin, dict) or not isinstance(twin.get("supported", False), bool):
                raise ProtocolError("VERSION: capability 'twin_socket' is malformed")
        known = {
            "max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
            "write_multiple", "migration", "twin_socket",
        }
        return cls(
            max_msg_fds=integer("max_msg_fds", C.DEFAULT_MAX_MSG_FDS, 0, 1024),
            max_data_xfer_size=integer("max_data_xfer_size", C.DEFAULT_MAX_DATA_XFER_SIZE, 1, _U32),
            max_dma_maps=integer("max_dma_maps", C.DEFAULT_MAX_DMA_MAPS, 0, _U32),
            pgsizes=integer("pgsizes", C.DEFAULT_PGSIZES, 1, _U64),
            write_multiple=wm,
            migration=mig,
            twin_socket=twin,
            extra={k: v for k, v in caps.items() if k not in known},
        )


@attrs.frozen(slots=True)
class Version:
    major: int
    minor: int
    capabilities: Capabilities = attrs.field(factory=Capabilities)
    has_json: bool = True
    cmd: ClassVar[int] = 1
    _S: ClassVar[struct.Struct] = struct.Struct("<HH")

    def pack(self, *, include: tuple[str, ...] | None = None) -> bytes:
        head = self._S.pack(self.major, self.minor)
        if not self.has_json:
            return head
        doc = {"capabilities": self.capabilities.to_json_obj(include=include)}
        # Compact separators: QEMU's reply buffer is the size of its own request.
        return head + json.dumps(doc, separators=(",", ":")).encode() + b"\0"

    @classmethod
    def unpack(cls, payload: bytes) -> "Version":
        _need(payload, 4, "VERSION")
        major, minor = cls._S.unpack_from(payload)
        text = payload[4:]
        if not text:
            return cls(major, minor, Capabilities(), has_json=False)
        if text[-1] != 0:
            raise ProtocolError("VERSION: JSON is not NUL-terminated")
        body = text[:-1]
        if b"\0" in body:
            raise ProtocolError("VERSION: embedded NUL in JSON")
        try:
            doc = json_limits.loads(body.decode("utf-8"), max_size=VERSION_JSON_MAX_SIZE,
                                    max_depth=VERSION_JSON_MAX_DEPTH) if body.strip() else {}
        except ValueError as exc:  # also UnicodeDecodeError and JsonLimitError
            raise ProtocolError(f"VERSION: invalid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ProtocolError("VERSION: JSON document is not an object")
        return cls(major, minor, Capabilities.from_json_obj(doc.get("capabilities", {})))


# --------------------------------------------------------------------------- DMA


@attrs.frozen(slots=True)
class DmaMap:
    argsz: int
    flags: int
    offset: int
    addr: int
    size: int
    cmd: ClassVar[int] = 2
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")
    SIZE: ClassVar[int] = 32

    @property
    def readable(self) -> bool:
        return bool(self.flags & C.VFIO_DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & C.VFIO_DMA_MAP_FLAG_WRITE)

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.offset, self.addr, self.size)

    @classmethod
    def unpack(cls, payload: bytes) -> "DmaMap":
        _need(payload, cls.SIZE, "DMA_MAP")
        argsz, flags, offset, addr, size = cls._S.unpack_from(payload)
        if argsz < cls.SIZE:
            raise ProtocolError(f"DMA_MAP: argsz {argsz} < {cls.SIZE}")
        if flags & ~(C.VFIO_DMA_MAP_FLAG_READ | C.VFIO_DMA_MAP_FLAG_WRITE):
            raise ProtocolError(f"DMA_MAP: unknown flags {flags:#x}")
        if size == 0:
            raise ProtocolError("DMA_MAP: zero size")
        if addr + size - 1 > _U64:
            raise ProtocolError("DMA_MAP: range wraps around the address space")
        return cls(argsz, flags, offset, addr, size)


@attrs.frozen(slots=True)
class DmaUnmap:
    argsz: int
    flags: int
    addr: int
    size: int
    cmd: ClassVar[int] = 3
    _S: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    SIZE: ClassVar[int] = 24

    @property
    def unmap_all(self) -> bool:
        return bool(self.flags & C.VFIO_DMA_UNMAP_FLAG_ALL)

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.addr, self.size)

    @classmethod
    def unpack(cls, payload: bytes) -> "DmaUnmap":
        _need(payload, cls.SIZE, "DMA_UNMAP")
        argsz, flags, addr, size = cls._S.unpack_from(payload)
        if argsz < cls.SIZE:
            # argsz is the largest reply accepted, and the reply echoes these 24 bytes.
            raise ProtocolError(f"DMA_UNMAP: argsz {argsz} < {cls.SIZE}")
        if flags & C.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise ProtocolError("DMA_UNMAP: dirty bitmaps are not supported", errno.ENOTSUP)
        if flags & ~C.VFIO_DMA_UNMAP_FLAG_ALL:
            raise ProtocolError(f"DMA_UNMAP: unknown flags {flags:#x}")
        if flags & C.VFIO_DMA_UNMAP_FLAG_ALL:
            if addr or size:
                raise ProtocolError("DMA_UNMAP: unmap-all needs addr and size 0")
        elif size == 0:
            raise ProtocolError("DMA_UNMAP: zero size")
        elif addr + size - 1 > _U64:
            raise ProtocolError("DMA_UNMAP: range wraps around the address space")
        return cls(argsz, flags, addr, size)


@attrs.frozen(slots=True)
class DmaAccess:
    """DMA_READ / DMA_WRITE (server to client): address, count, data."""

    addr: int
    count: int
    data: bytes = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<QQ")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._S.pack(self.addr, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes, *, with_data: bool) -> "DmaAccess":
        _need(payload, cls.SIZE, "DMA access")
        addr, count = cls._S.unpack_from(payload)
        data = payload[cls.SIZE :]
        if with_data and len(data) != count:
            raise ProtocolError(f"DMA access: {len(data)} data bytes for count {count}")
        if not with_data and data:
            raise ProtocolError("DMA access: unexpected trailing data")
        return cls(addr, count, data)


# --------------------------------------------------------------------------- device info


@attrs.frozen(slots=True)
class DeviceInfo:
    argsz: int
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    cmd: ClassVar[int] = 4
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)

    @classmethod
    def unpack(cls, payload: bytes) -> "DeviceInfo":
        _need(payload, cls.SIZE, "DEVICE_GET_INFO")
        info = cls(*cls._S.unpack_from(payload))
        if info.argsz < cls.SIZE:
            raise ProtocolError(f"DEVICE_GET_INFO: argsz {info.argsz} < {cls.SIZE}")
        return info


@attrs.frozen(slots=True)
class SparseMmapCap:
    areas: tuple[tuple[int, int], ...]  # (offset, size) relative to the region
    id: ClassVar[int] = C.VFIO_REGION_INFO_CAP_SPARSE_MMAP

    def body(self) -> bytes:
        return struct.pack("<II", len(self.areas), 0) + b"".join(
            struct.pack("<QQ", off, size) for off, size in self.areas
        )


@attrs.frozen(slots=True)
class TypeCap:
    type: int
    subtype: int
    id: ClassVar[int] = C.VFIO_REGION_INFO_CAP_TYPE

    def body(self) -> bytes:
        return struct.pack("<II", self.type, self.subtype)


RegionCap = SparseMmapCap | TypeCap


@attrs.frozen(slots=True)
class RegionInfo:
    argsz: int
    flags: int = 0
    index: int = 0
    cap_offset: int = 0
    size: int = 0
    offset: int = 0
    caps: tuple[RegionCap, ...] = ()
    cmd: ClassVar[int] = 5
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")
    SIZE: ClassVar[int] = 32

    def pack_request(self) -> bytes:
        return self._S.pack(self.argsz, 0, self.index, 0, 0, 0)

    def pack_reply(self, max_len: int) -> tuple[bytes, bool]:
        """Reply bytes limited to the requester's argsz; True if caps (and fd) fit."""
        chain = b""
        if self.caps:
            parts = []
            off = self.SIZE
            for i, cap in enumerate(self.caps):
                body = cap.body()
                nxt = off + 8 + len(body) if i + 1 < len(self.caps) else 0
                parts.append(struct.pack("<HHI", cap.id, 1, nxt) + body)
                off += 8 + len(body)
            chain = b"".join(parts)
        full = self.SIZE + len(chain)
        fits = bool(chain) and max_len >= full
        flags = self.flags
        if fits:
            flags |= C.VFIO_REGION_INFO_FLAG_CAPS
        head = self._S.pack(
            full, flags, self.index, self.SIZE if fits else 0, self.size, self.offset
        )
        return (head + chain if fits else head), fits

    @classmethod
    def unpack_request(cls, payload: bytes) -> "RegionInfo":
        _need(payload, cls.SIZE, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = cls._S.unpack_from(payload)
        if argsz < cls.SIZE:
            raise ProtocolError(f"DEVICE_GET_REGION_INFO: argsz {argsz} < {cls.SIZE}")
        return cls(argsz=argsz, index=index)

    @classmethod
    def unpack_reply(cls, payload: bytes) -> "RegionInfo":
        _need(payload, cls.SIZE, "region info reply")
        argsz, flags, index, cap_offset, size, offset = cls._S.unpack_from(payload)
        caps: list[RegionCap] = []
        if flags & C.VFIO_REGION_INFO_FLAG_CAPS:
            pos, seen = cap_offset, 0
            while pos:
                if pos < cls.SIZE or pos + 8 > len(payload) or seen > 64:
                    raise ProtocolError("region info: capability chain out of bounds")
                cid, _ver, nxt = struct.unpack_from("<HHI", payload, pos)
                if cid == C.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    _need(payload, pos + 16, "sparse mmap cap")
                    nr, _ = struct.unpack_from("<II", payload, pos + 8)
                    _need(payload, pos + 16 + 16 * nr, "sparse mmap areas")
                    areas = tuple(
                        struct.unpack_from("<QQ", payload, pos + 16 + 16 * i) for i in range(nr)
                    )
                    caps.append(SparseMmapCap(areas))
                elif cid == C.VFIO_REGION_INFO_CAP_TYPE:
                    _need(payload, pos + 16, "type cap")
                    caps.append(TypeCap(*struct.unpack_from("<II", payload, pos + 8)))
                if nxt and nxt <= pos:
                    raise ProtocolError("region info: capability chain loops")
                pos, seen = nxt, seen + 1
        return cls(argsz, flags, index, cap_offset, size, offset, tuple(caps))


@attrs.frozen(slots=True)
class RegionIoFds:
    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0
    cmd: ClassVar[int] = 6
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> "RegionIoFds":
        _need(payload, cls.SIZE, "DEVICE_GET_REGION_IO_FDS")
        r = cls(*cls._S.unpack_from(payload))
        if r.argsz < cls.SIZE or r.flags or r.count:
            raise ProtocolError("DEVICE_GET_REGION_IO_FDS: bad argsz/flags/count")
        return r


@attrs.frozen(slots=True)
class IrqInfo:
    argsz: int
    flags: int = 0
    index: int = 0
    count: int = 0
    cmd: ClassVar[int] = 7
    _S: ClassVar[struct.Struct] = struct.Struct("<IIII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, payload: bytes) -> "IrqInfo":
        _need(payload, cls.SIZE, "DEVICE_GET_IRQ_INFO")
        r = cls(*cls._S.unpack_from(payload))
        if r.argsz < cls.SIZE:
            raise ProtocolError(f"DEVICE_GET_IRQ_INFO: argsz {r.argsz} < {cls.SIZE}")
        return r


@attrs.frozen(slots=True)
class IrqSet:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    cmd: ClassVar[int] = 8
    _S: ClassVar[struct.Struct] = struct.Struct("<IIIII")
    SIZE: ClassVar[int] = 20

    @property
    def data_type(self) -> int:
        return self.flags & C.VFIO_IRQ_SET_DATA_TYPE_MASK

    @property
    def action(self) -> int:
        return self.flags & C.VFIO_IRQ_SET_ACTION_TYPE_MASK

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags, self.index, self.start, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> "IrqSet":
        _need(payload, cls.SIZE, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = cls._S.unpack_from(payload)
        # QEMU sends argsz 20 even with eventfds attached: do not insist on more.
        if argsz < cls.SIZE:
            raise ProtocolError(f"DEVICE_SET_IRQS: argsz {argsz} < {cls.SIZE}")
        if flags & ~0x3F:
            raise ProtocolError(f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        dt = flags & C.VFIO_IRQ_SET_DATA_TYPE_MASK
        act = flags & C.VFIO_IRQ_SET_ACTION_TYPE_MASK
        if dt not in (C.VFIO_IRQ_SET_DATA_NONE, C.VFIO_IRQ_SET_DATA_BOOL, C.VFIO_IRQ_SET_DATA_EVENTFD):
            raise ProtocolError("DEVICE_SET_IRQS: exactly one DATA_* flag required")
        if act not in (
            C.VFIO_IRQ_SET_ACTION_MASK, C.VFIO_IRQ_SET_ACTION_UNMASK, C.VFIO_IRQ_SET_ACTION_TRIGGER
        ):
            raise ProtocolError("DEVICE_SET_IRQS: exactly one ACTION_* flag required")
        data = payload[cls.SIZE :]
        if dt == C.VFIO_IRQ_SET_DATA_BOOL:
            if len(data) != count:
                raise ProtocolError(f"DEVICE_SET_IRQS: {len(data)} bool bytes for count {count}")
        elif data:
            raise ProtocolError("DEVICE_SET_IRQS: unexpected data")
        if start + count > _U32:
            raise ProtocolError("DEVICE_SET_IRQS: start+count overflows")
        return cls(argsz, flags, index, start, count, data)


# --------------------------------------------------------------------------- region access


@attrs.frozen(slots=True)
class RegionAccess:
    """REGION_READ / REGION_WRITE: offset, region index, count, data."""

    offset: int
    region: int
    count: int
    data: bytes = b""
    _S: ClassVar[struct.Struct] = struct.Struct("<QII")
    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return self._S.pack(self.offset, self.region, self.count) + self.data

    def pack_head(self) -> bytes:
        return self._S.pack(self.offset, self.region, self.count)

    @classmethod
    def unpack(cls, payload: bytes, *, with_data: bool) -> "RegionAccess":
        _need(payload, cls.SIZE, "region access")
        offset, region, count = cls._S.unpack_from(payload)
        data = payload[cls.SIZE :]
        if with_data:
            if len(data) != count:
                raise ProtocolError(f"region access: {len(data)} data bytes for count {count}")
        elif data:
            raise ProtocolError("region access: unexpected trailing data")
        return cls(offset, region, count, data)


@attrs.frozen(slots=True)
class WriteMultiEntry:
    offset: int
    region: int
    count: int
    data: bytes


@attrs.frozen(slots=True)
class RegionWriteMulti:
    entries: tuple[WriteMultiEntry, ...]
    cmd: ClassVar[int] = 15
    _E: ClassVar[struct.Struct] = struct.Struct("<QII8s")
    MAX_ENTRIES: ClassVar[int] = 1024

    def pack(self) -> bytes:
        return struct.pack("<Q", len(self.entries)) + b"".join(
            self._E.pack(e.offset, e.region, e.count, e.data.ljust(8, b"\0")) for e in self.entries
        )

    @classmethod
    def unpack(cls, payload: bytes) -> "RegionWriteMulti":
        _need(payload, 8, "REGION_WRITE_MULTI")
        (n,) = struct.unpack_from("<Q", payload)
        if n > cls.MAX_ENTRIES:
            raise ProtocolError(f"REGION_WRITE_MULTI: {n} entries exceed {cls.MAX_ENTRIES}")
        _exact(payload, 8 + n * cls._E.size, "REGION_WRITE_MULTI")
        entries = []
        for i in range(n):
            off, region, count, data = cls._E.unpack_from(payload, 8 + i * cls._E.size)
            if not 1 <= count <= 8:
                raise ProtocolError(f"REGION_WRITE_MULTI: entry count {count} not in 1..8")
            entries.append(WriteMultiEntry(off, region, count, data[:count]))
        return cls(tuple(entries))


@attrs.frozen(slots=True)
class DeviceFeature:
    argsz: int
    flags: int
    data: bytes = b""
    cmd: ClassVar[int] = 16
    _S: ClassVar[struct.Struct] = struct.Struct("<II")
    SIZE: ClassVar[int] = 8

    @property
    def feature(self) -> int:
        return self.flags & C.VFIO_DEVICE_FEATURE_MASK

    def pack(self) -> bytes:
        return self._S.pack(self.argsz, self.flags) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> "DeviceFeature":
        _need(payload, cls.SIZE, "DEVICE_FEATURE")
        argsz, flags = cls._S.unpack_from(payload)
        ops = flags & (C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET | C.VFIO_DEVICE_FEATURE_PROBE)
        if flags & ~(C.VFIO_DEVICE_FEATURE_MASK | ops):
            raise ProtocolError(f"DEVICE_FEATURE: unknown flags {flags:#x}")
        get_set = flags & (C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET)
        if get_set == (C.VFIO_DEVICE_FEATURE_GET | C.VFIO_DEVICE_FEATURE_SET) and not (
            flags & C.VFIO_DEVICE_FEATURE_PROBE
        ):
            raise ProtocolError("DEVICE_FEATURE: GET and SET together without PROBE")
        if not ops:
            raise ProtocolError("DEVICE_FEATURE: none of GET/SET/PROBE")
        return cls(argsz, flags, payload[cls.SIZE :])
