"""Virtio PCI modern transport: vendor capabilities and the BAR holding the virtio structures.

Layout of the virtio BAR (16 KiB, every structure in its own 4 KiB page):
  0x0000 common configuration (struct virtio_pci_common_cfg, 0x40 bytes)
  0x1000 ISR status (1 byte, read clears)
  0x2000 device-specific configuration
  0x3000 notifications: queue q at q * NOTIFY_OFF_MULTIPLIER
Registers accept any access width and offset (s390 PCILG/PCISTG carry 1..8
bytes; Linux splits the 64-bit queue addresses into two 32-bit writes).
"""

from __future__ import annotations

import struct
from typing import Protocol

import attrs

from zpcid.pci.config import PCI_CAP_ID_VNDR, ConfigSpace
from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.regions import WindowedRegion

# PCI identity (virtio 1.x, 4.1.2): modern device id = 0x1040 + virtio device id.
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
# Linux ignores the subsystem ids of modern devices; QEMU's values, so tools
# that show them see what they are used to.
VIRTIO_PCI_SUBSYS_VENDOR_ID = 0x1AF4
VIRTIO_PCI_SUBSYS_ID = 0x1100
VIRTIO_PCI_REVISION = 1  # non-transitional devices: revision >= 1

# virtio_pci_cap.cfg_type
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# Device status bits
VIRTIO_CONFIG_S_ACKNOWLEDGE = 0x01
VIRTIO_CONFIG_S_DRIVER = 0x02
VIRTIO_CONFIG_S_DRIVER_OK = 0x04
VIRTIO_CONFIG_S_FEATURES_OK = 0x08
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# Transport feature bits
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# Offsets in struct virtio_pci_common_cfg (+ the virtio_pci_modern_common_cfg tail)
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_AVAILLO = 0x28
COMMON_Q_USEDLO = 0x30
COMMON_Q_NDATA = 0x38
COMMON_Q_RESET = 0x3A
COMMON_ADM_Q_IDX = 0x3C
COMMON_ADM_Q_NUM = 0x3E
COMMON_CFG_SIZE = 0x40

BAR_SIZE = 0x4000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
AREA_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4
MAX_QUEUES = AREA_SIZE // NOTIFY_OFF_MULTIPLIER

# (offset, size, name) of the writable/readable common-config fields
_FIELDS = (
    (COMMON_DFSELECT, 4, "dfselect"), (COMMON_DF, 4, "df"), (COMMON_GFSELECT, 4, "gfselect"),
    (COMMON_GF, 4, "gf"), (COMMON_MSIX, 2, "msix"), (COMMON_NUMQ, 2, "numq"),
    (COMMON_STATUS, 1, "status"), (COMMON_CFGGENERATION, 1, "generation"),
    (COMMON_Q_SELECT, 2, "q_select"), (COMMON_Q_SIZE, 2, "q_size"), (COMMON_Q_MSIX, 2, "q_msix"),
    (COMMON_Q_ENABLE, 2, "q_enable"), (COMMON_Q_NOFF, 2, "q_noff"), (COMMON_Q_DESCLO, 8, "q_desc"),
    (COMMON_Q_AVAILLO, 8, "q_avail"), (COMMON_Q_USEDLO, 8, "q_used"), (COMMON_Q_NDATA, 2, "q_ndata"),
    (COMMON_Q_RESET, 2, "q_reset"), (COMMON_ADM_Q_IDX, 2, "adm_idx"), (COMMON_ADM_Q_NUM, 2, "adm_num"),
)


@attrs.define
class QueueConfig:
    """Driver-programmed configuration of one virtqueue."""

    max_size: int
    size: int = 0
    vector: int = VIRTIO_MSI_NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0  # avail ring
    device: int = 0  # used ring

    def reset(self) -> None:
        self.size, self.vector, self.enabled = self.max_size, VIRTIO_MSI_NO_VECTOR, False
        self.desc = self.driver = self.device = 0


class VirtioDeviceHooks(Protocol):
    """What the transport asks of the device model behind it."""

    async def virtio_reset(self) -> None: ...  # driver wrote status 0; stop and drain
    async def virtio_driver_ok(self) -> None: ...  # start processing queues
    def virtio_enable_queue(self, index: int, q: QueueConfig) -> str | None: ...  # error text or None
    def virtio_notify(self, index: int) -> None: ...
    def virtio_config_interrupt(self) -> None: ...  # raise the config-change vector
    def virtio_features_ok(self, features: int) -> bool: ...
    def device_config(self) -> bytes: ...


def add_virtio_cap(cfg: ConfigSpace, cfg_type: int, bar: int, offset: int, length: int,
                   extra: bytes = b"") -> int:
    """Append a struct virtio_pci_cap (vendor-specific capability) to config space."""
    cap_len = 16 + len(extra)
    # cap_len counts the whole capability, including the 2-byte id/next header.
    body = struct.pack("<BBBBxxII", cap_len, cfg_type, bar, 0, offset, length) + extra
    return cfg.add_capability(PCI_CAP_ID_VNDR, body)


class VirtioPciTransport:
    """The common configuration state machine and the BAR that exposes it."""

    def __init__(self, cfg: ConfigSpace, hooks: VirtioDeviceHooks, *, bar: int,
                 device_features: int, num_queues: int, queue_max: int,
                 msix_vectors: int, device_config_size: int, log):
        if not 1 <= num_queues <= MAX_QUEUES:
            raise ValueError(f"num_queues must be in 1..{MAX_QUEUES}")
        if device_config_size > AREA_SIZE:
            raise ValueError("device configuration does not fit its area")
        self.hooks = hooks
        self.log = log
        self.bar = bar
        self.device_features = device_features | (1 << VIRTIO_F_VERSION_1)
        self.msix_vectors = msix_vectors
        self.queues = [QueueConfig(queue_max) for _ in range(num_queues)]
        self.region = WindowedRegion(BAR_SIZE)
        self.region.add(COMMON_OFFSET, COMMON_CFG_SIZE, self._common_read, self._common_write)
        self.region.add(ISR_OFFSET, 4, self._isr_read, self._ignore_write)
        self.region.add(DEVICE_OFFSET, AREA_SIZE, self._device_read, self._ignore_write)
        self.region.add(NOTIFY_OFFSET, AREA_SIZE, self._notify_read, self._notify_write)
        add_virtio_cap(cfg, VIRTIO_PCI_CAP_COMMON_CFG, bar, COMMON_OFFSET, COMMON_CFG_SIZE)
        add_virtio_cap(cfg, VIRTIO_PCI_CAP_NOTIFY_CFG, bar, NOTIFY_OFFSET,
                       num_queues * NOTIFY_OFF_MULTIPLIER, struct.pack("<I", NOTIFY_OFF_MULTIPLIER))
        add_virtio_cap(cfg, VIRTIO_PCI_CAP_ISR_CFG, bar, ISR_OFFSET, 1)
        add_virtio_cap(cfg, VIRTIO_PCI_CAP_DEVICE_CFG, bar, DEVICE_OFFSET, device_config_size)
        self.reset()

    def reset(self) -> None:
        """Register state after a device reset (status 0)."""
        self.dfselect = self.gfselect = 0
        self.driver_features = 0
        self.status = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.q_select = 0
        self.isr = 0
        self.generation = 0
        for q in self.queues:
            q.reset()

    # ------------------------------------------------------------------ snapshot
    def snapshot(self) -> "TransportSnapshot":
        """Registers as the driver programmed them: negotiation, status, vectors, queues."""
        return TransportSnapshot(
            device_features=self.device_features, driver_features=self.driver_features,
            dfselect=self.dfselect, gfselect=self.gfselect, status=self.status,
            config_vector=self.config_vector, q_select=self.q_select, isr=self.isr,
            generation=self.generation,
            queues=tuple((q.max_size, q.size, q.vector, q.enabled, q.desc, q.driver, q.device)
                         for q in self.queues))

    def restore(self, snap: "TransportSnapshot") -> None:
        """Take the registers as they were (the device model restarts its queues itself)."""
        expect(snap, TransportSnapshot)
        require(snap.device_features == self.device_features,
                f"virtio features {snap.device_features:#x} offered in the snapshot, "
                f"{self.device_features:#x} here (another configuration)")
        require(len(snap.queues) == len(self.queues) and all(
            t[0] == q.max_size for t, q in zip(snap.queues, self.queues)),
            "virtio queue count or maximum size differs from the snapshot")
        self.dfselect, self.gfselect = snap.dfselect, snap.gfselect
        self.driver_features, self.status = snap.driver_features, snap.status
        self.config_vector, self.q_select = snap.config_vector, snap.q_select
        self.isr, self.generation = snap.isr, snap.generation
        for q, (_, size, vector, enabled, desc, driver, device) in zip(self.queues, snap.queues):
            q.size, q.vector, q.enabled, q.desc, q.driver, q.device = size, vector, enabled, desc, driver, device

    # ------------------------------------------------------------------ state
    @property
    def features(self) -> int:
        """Negotiated features (valid once FEATURES_OK stuck)."""
        return self.driver_features & self.device_features

    def has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_DRIVER_OK)

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & VIRTIO_CONFIG_S_NEEDS_RESET)

    def set_needs_reset(self) -> bool:
        """Flag an unrecoverable device error; True if the flag was newly set."""
        if self.needs_reset or not self.status:
            return False
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        return True

    def device_error(self, reason: str, **kw) -> None:
        """Unrecoverable device error: set NEEDS_RESET and tell the driver."""
        if self.set_needs_reset():
            self.log.warning("virtio_needs_reset", reason=reason, **kw)
            self.hooks.virtio_config_interrupt()

    def config_changed(self) -> None:
        self.generation = (self.generation + 1) & 0xFF
        self.isr |= VIRTIO_PCI_ISR_CONFIG
        self.hooks.virtio_config_interrupt()

    def _selected(self) -> QueueConfig | None:
        return self.queues[self.q_select] if self.q_select < len(self.queues) else None

    # ------------------------------------------------------------------ common cfg
    def _field(self, name: str) -> int:
        q = self._selected()
        if name == "dfselect":
            return self.dfselect
        if name == "df":
            return (self.device_features >> (32 * self.dfselect)) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if name == "gfselect":
            return self.gfselect
        if name == "gf":
            return (self.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF if self.gfselect < 2 else 0
        if name == "msix":
            return self.config_vector
        if name == "numq":
            return len(self.queues)
        if name == "status":
            return self.status
        if name == "generation":
            return self.generation
        if name == "q_select":
            return self.q_select
        if q is None:
            return 0  # an absent queue reads as size 0 (how drivers detect the end)
        return {
            "q_size": q.size, "q_msix": q.vector, "q_enable": int(q.enabled),
            "q_noff": self.q_select, "q_desc": q.desc, "q_avail": q.driver, "q_used": q.device,
            "q_ndata": self.q_select,
        }.get(name, 0)

    def _snapshot(self) -> bytearray:
        buf = bytearray(COMMON_CFG_SIZE)
        for off, size, name in _FIELDS:
            buf[off : off + size] = self._field(name).to_bytes(size, "little")
        return buf

    async def _common_read(self, offset: int, count: int) -> bytes:
        return bytes(self._snapshot()[offset : offset + count])

    async def _common_write(self, offset: int, data: bytes) -> None:
        snap = self._snapshot()
        end = offset + len(data)
        for off, size, name in _FIELDS:
            if offset < off + size and end > off:
                cur = bytearray(snap[off : off + size])
                for i in range(size):
                    if offset <= off + i < end:
                        cur[i] = data[off + i - offset]
                await self._set_field(name, int.from_bytes(cur, "little"))

    async def _set_field(self, name: str, value: int) -> None:
        q = self._selected()
        if name == "dfselect":
            self.dfselect = value
        elif name == "gfselect":
            self.gfselect = value
        elif name == "gf":
            if self.status & VIRTIO_CONFIG_S_FEATURES_OK or self.gfselect >= 2:
                return  # features are frozen once accepted
            shift = 32 * self.gfselect
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif name == "msix":
            self.config_vector = value if value < self.msix_vectors else VIRTIO_MSI_NO_VECTOR
        elif name == "status":
            await self._set_status(value)
        elif name == "q_select":
            self.q_select = value
        elif q is not None and not self.driver_ok:
            # Queue registers are frozen while the device is live (no RING_RESET).
            if name == "q_size":
                q.size = value
            elif name == "q_msix":
                q.vector = value if value < self.msix_vectors else VIRTIO_MSI_NO_VECTOR
            elif name == "q_enable":
                if value == 1 and not q.enabled:
                    error = self.hooks.virtio_enable_queue(self.q_select, q)
                    if error is None:
                        q.enabled = True
                    else:
                        self.device_error("queue_rejected", queue=self.q_select, error=error)
            elif name == "q_desc":
                q.desc = value
            elif name == "q_avail":
                q.driver = value
            elif name == "q_used":
                q.device = value
        # Read-only fields (df, numq, generation, q_noff, ...) ignore writes.

    async def _set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            await self.hooks.virtio_reset()
            self.reset()
            self.log.info("virtio_reset")
            return
        old = self.status
        # NEEDS_RESET belongs to the device: a driver cannot clear it.
        new = (value & ~VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET)
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            feats = self.driver_features
            ok = (feats & ~self.device_features == 0 and feats >> VIRTIO_F_VERSION_1 & 1
                  and self.hooks.virtio_features_ok(feats))
            if not ok:
                # The driver reads FEATURES_OK back and gives up (virtio 1.x 3.1.1).
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
                self.log.warning("virtio_features_rejected", driver=hex(feats),
                                 device=hex(self.device_features))
            else:
                self.log.info("virtio_features", features=hex(feats))
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                self.log.warning("virtio_driver_ok_without_features_ok")
                new &= ~VIRTIO_CONFIG_S_DRIVER_OK
            else:
                self.status = new
                await self.hooks.virtio_driver_ok()
                self.log.info("virtio_driver_ok",
                              queues=[i for i, q in enumerate(self.queues) if q.enabled])
                return
        self.status = new

    # ------------------------------------------------------------------ other areas
    async def _isr_read(self, offset: int, count: int) -> bytes:
        out = bytes([self.isr, 0, 0, 0])[offset : offset + count]
        if offset == 0:
            self.isr = 0  # reading the ISR acknowledges it
        return out

    async def _device_read(self, offset: int, count: int) -> bytes:
        return self.hooks.device_config()[offset : offset + count].ljust(count, b"\0")

    async def _ignore_write(self, offset: int, data: bytes) -> None:
        pass

    async def _notify_read(self, offset: int, count: int) -> bytes:
        return bytes(count)

    async def _notify_write(self, offset: int, data: bytes) -> None:
        self.hooks.virtio_notify(offset // NOTIFY_OFF_MULTIPLIER)


@attrs.frozen
class TransportSnapshot(Snapshot):
    KIND = "devices.virtio.pci"
    device_features: int
    driver_features: int
    dfselect: int
    gfselect: int
    status: int
    config_vector: int
    q_select: int
    isr: int
    generation: int
    queues: tuple  # (max_size, size, vector, enabled, desc, driver, device) per queue
