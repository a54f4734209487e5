"""A PCI function served over vfio-user: config space, BARs, MSI-X, IRQs, DMA."""

from __future__ import annotations

import collections
from typing import Any, Protocol, Sequence

import attrs
import trio

from protocol.vfio_user import consts as C
from protocol.vfio_user.messages import IrqSet
from zpcid import log
from zpcid.snapshot import Snapshot, expect, require
from zpcid.vfio_user.device import RegionDesc, Session
from zpcid.vfio_user.dma import DmaSpace
from zpcid.vfio_user.irq import IrqTable
from zpcid.pci.msix import Msix
from zpcid.pci.config import Bar, ConfigRegion, ConfigSpace
from zpcid.vfio_user.regions import Region, RegionError, WindowedRegion


@attrs.define
class FunctionCounters:
    """Monotonic per-function counters (exported as Prometheus ``_total`` metrics)."""

    rpcit_calls: int = 0
    shadow_fills: int = 0  # shadow misses walked in the guest's tables (lazy translation)
    pages_mapped: int = 0
    pages_unmapped: int = 0
    dma_bytes_read: int = 0
    dma_bytes_written: int = 0
    interrupts: int = 0
    attaches: int = 0
    # DMA_MAP / DMA_UNMAP requests that changed the client's DMA space: counted,
    # not logged (stock QEMU on s390x sends one per guest page).
    vfio_dma_maps: int = 0
    vfio_dma_unmaps: int = 0
    errors: collections.Counter = attrs.field(factory=collections.Counter)  # kind -> count


class FunctionExtension(Protocol):
    """A layer composed onto a function from above (the zPCI layer): it brings a
    device-specific region, the DMA path device models use, and a hook before
    each MSI-X eventfd is signalled; the function tells it of its life cycle."""

    region_index: int
    region: Region
    dma_path: Any  # async read/write/copy, views: IOVAs as the device sees them

    def deliver_interrupt(self, vector: int) -> bool: ...  # False suppresses the eventfd
    def bars_changed(self) -> None: ...
    def reset(self) -> None: ...  # DEVICE_RESET
    def power_on(self) -> None: ...  # the client left
    def session_started(self) -> None: ...
    def session_ended(self) -> None: ...
    def release_requested(self) -> None: ...
    def function_info(self) -> dict[str, Any]: ...  # merged into describe()
    def properties(self) -> dict[str, Any]: ...
    def set_properties(self, props: dict[str, Any]) -> None: ...  # SnapshotError if unusable
    def snapshot(self) -> Snapshot: ...
    def restore(self, snap: Snapshot) -> None: ...


class PciFunction:
    """Base of every function type; subclasses add BARs and behaviour."""

    type_name = "pci"

    def __init__(self, name: str, *, vendor: int, device: int, class_code: int = 0xFF0000,
                 subsys_vendor: int = 0, subsys: int = 0, revision: int = 0,
                 msix_vectors: int = 4, max_dma_maps: int = 65535):
        self.name = name
        self.counters = FunctionCounters()
        self.log = log.get("zpcid.pci.function", function=name)
        self.config = ConfigSpace(vendor, device, class_code, subsys_vendor, subsys, revision)
        self.config.add_pcie_capability()
        self.regions: dict[int, Region] = {C.VFIO_PCI_CONFIG_REGION_INDEX: ConfigRegion(self.config)}
        self.irqs = IrqTable(
            {C.VFIO_PCI_MSIX_IRQ_INDEX: msix_vectors, C.VFIO_PCI_ERR_IRQ_INDEX: 1,
             C.VFIO_PCI_REQ_IRQ_INDEX: 1},
            maskable=frozenset({C.VFIO_PCI_MSIX_IRQ_INDEX}),
        )
        self.msix: Msix | None = None
        self._msix_vectors = msix_vectors
        self.dma = DmaSpace(max_dma_maps)
        self.session: Session | None = None
        # Session-scoped nursery (set by the server): device work that may wait on
        # the client must not run inside a register access, because QEMU serves
        # DMA_READ/DMA_WRITE under the lock its vCPU holds while it waits for
        # our reply to that access.
        self._tasks: trio.Nursery | None = None
        self._running = 0  # deferred device tasks at work
        self._idle = trio.Event()  # set (and replaced) whenever the last one ends
        # The layer composed onto this function from above (zPCI), and what
        # device models use for DMA: async read(iova, n) / write(iova, data).
        self.ext: FunctionExtension | None = None
        self.dma_path: Any = None

    def attach_extension(self, ext: FunctionExtension) -> None:
        """Compose ``ext`` onto this function: its region, DMA path and interrupt hook."""
        self.ext = ext
        self.regions[ext.region_index] = ext.region
        self.dma_path = ext.dma_path
        if self.msix is not None:
            self.msix.deliver_hook = ext.deliver_interrupt

    @property
    def tasks(self) -> trio.Nursery | None:
        return self._tasks

    @tasks.setter
    def tasks(self, nursery: trio.Nursery | None) -> None:
        """The session's nursery (set by the server while a client is attached)."""
        self._tasks = nursery
        if self.ext is not None:
            self.ext.session_started() if nursery is not None else self.ext.session_ended()

    # ------------------------------------------------------------------ building
    def add_bar(self, index: int, region: Region, *, is64: bool = True, prefetch: bool = False) -> Bar:
        bar = Bar(index, region, is64, prefetch)
        self.config.add_bar(bar)
        self.regions[index] = region
        if self.ext is not None:
            self.ext.bars_changed()
        return bar

    def add_msix_bar(self, index: int, size: int = 0x4000) -> WindowedRegion:
        """A trapped BAR holding the MSI-X table (offset 0) and PBA (second half)."""
        region = WindowedRegion(size)
        self.msix = Msix(self.config, self.irqs, self._msix_vectors, index, 0, size // 2)
        if self.ext is not None:
            self.msix.deliver_hook = self.ext.deliver_interrupt
        region.add(0, self.msix.table_size, self.msix.table_read, self.msix.table_write)
        region.add(size // 2, self.msix.pba_size, self.msix.pba_read, self.msix.pba_write)
        self.add_bar(index, region)
        return region

    def add_region(self, index: int, region: Region) -> None:
        if index < C.VFIO_PCI_NUM_REGIONS:
            raise ValueError("device-specific regions start at index 9")
        self.regions[index] = region

    async def defer(self, async_fn, *args) -> None:
        """Run device work after the current message is answered (inline without a session)."""
        self._running += 1  # counted from now: quiesce() must wait for it even unstarted
        if self.tasks is None:
            await self._guarded(async_fn, *args)
            return
        try:
            self.tasks.start_soon(self._guarded, async_fn, *args)
        except RuntimeError:  # the session is ending
            self._running -= 1
            raise

    async def _guarded(self, async_fn, *args) -> None:
        try:
            await async_fn(*args)
        except Exception:  # a device bug must not end the client's session
            self.log.exception("device_task_failed")
            self.counters.errors["device_task"] += 1
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()
                self._idle = trio.Event()

    # ------------------------------------------------------------------ lifecycle
    def attach(self, session: Session, *, resumed: bool = False) -> None:
        """A client is attached (``resumed``: the same client, carried over a restart)."""
        self.session = session
        self.dma.message_io = session
        if not resumed:
            self.counters.attaches += 1

    def detach(self) -> None:
        """The client left: drop its DMA maps and eventfds, reset the function."""
        self.dma.message_io = None
        self.dma.close()
        self.irqs.clear()
        self.session = None
        self.reset_state()
        # The guest went with its VMM: the next one starts from a configured,
        # disabled function with nothing registered.
        if self.ext is not None:
            self.ext.power_on()

    def reset_state(self) -> None:
        """Function-level reset of emulated state (kept: client DMA maps, eventfds)."""
        # BAR addresses, command register, interrupt line, PCIe control: nothing of
        # the previous guest's programming survives.
        self.config.reset()
        if self.msix is not None:
            self.msix.reset()

    async def reset(self) -> None:
        self.log.info("device_reset")
        self.reset_state()
        if self.ext is not None:
            self.ext.reset()

    def release_requested(self) -> bool:
        """The VMM is asked to let go of the function; False if it cannot hear that."""
        # zPCI: the guest learns through a "deconfiguration requested" event;
        # vfio-user: the VMM through its REQ eventfd.
        if self.ext is not None:
            self.ext.release_requested()
        return self.irqs.signal(C.VFIO_PCI_REQ_IRQ_INDEX)

    # ------------------------------------------------------------------ vfio-user device API
    def device_info(self) -> tuple[int, int, int]:
        num_regions = max(C.VFIO_PCI_NUM_REGIONS, max(self.regions) + 1)
        return C.VFIO_DEVICE_FLAGS_PCI | C.VFIO_DEVICE_FLAGS_RESET, num_regions, C.VFIO_PCI_NUM_IRQS

    def region_info(self, index: int) -> RegionDesc:
        region = self.regions.get(index)
        if region is None:
            if index >= self.device_info()[1]:
                raise RegionError(f"region index {index} does not exist")
            return RegionDesc(0, 0)
        return RegionDesc(region.flags(), region.size, region.caps(), region.mmap_fd(), 0)

    def _region(self, index: int) -> Region:
        region = self.regions.get(index)
        if region is None:
            raise RegionError(f"region {index} is not implemented")
        return region

    async def region_read(self, index: int, offset: int, count: int) -> bytes:
        region = self._region(index)
        region.check(offset, count)
        if not region.readable:
            raise RegionError(f"region {index} is not readable")
        return await region.read(offset, count)

    async def region_write(self, index: int, offset: int, data: bytes) -> None:
        region = self._region(index)
        region.check(offset, len(data))
        if not region.writable:
            raise RegionError(f"region {index} is not writable")
        await region.write(offset, data)

    def irq_info(self, index: int) -> tuple[int, int]:
        return self.irqs.info(index)

    def set_irqs(self, req: IrqSet, fds: Sequence[int]) -> list[int]:
        return self.irqs.apply(req, fds)

    def dma_map(self, iova: int, size: int, readable: bool, writable: bool,
                fd: int | None, offset: int) -> None:
        self.dma.add(iova, size, readable, writable, fd, offset)
        self.counters.vfio_dma_maps += 1

    def dma_unmap(self, iova: int, size: int) -> int:
        n = len(self.dma.remove(iova, size))
        self.counters.vfio_dma_unmaps += n
        return n

    def dma_unmap_all(self) -> int:
        n = len(self.dma.clear())
        self.counters.vfio_dma_unmaps += n
        return n

    def describe(self) -> dict[str, Any]:
        """State for the control socket (``zpcictl show``); JSON-serialisable."""
        cfg = self.config
        return {
            "name": self.name,
            "type": self.type_name,
            "vendor": cfg.u16(0),
            "device": cfg.u16(2),
            "attached": self.session is not None,
            "dma_maps": len(self.dma),
            "irq_eventfds": self.irqs.installed(),
            "msix_enabled": bool(self.msix and self.msix.enabled),
            "counters": {k: v for k, v in attrs.asdict(self.counters).items() if k != "errors"}
            | {"errors": dict(self.counters.errors)},
        } | (self.ext.function_info() if self.ext is not None else {})

    # ------------------------------------------------------------------ quiesce
    async def quiesce(self) -> None:
        """Return once no device work runs and none will start by itself.

        The caller has stopped serving messages (the only other source of work).
        """
        while self._running:
            await self._idle.wait()
        await self.device_quiesce()

    def resume(self) -> None:
        """Undo ``quiesce`` (the hand-over was abandoned)."""
        self.device_resume()

    async def device_quiesce(self) -> None:
        """Device types with work of their own (queue services) stop it here."""

    def device_resume(self) -> None:
        pass

    def release(self) -> None:
        """Forget everything after a hand-over: close our copies of the fds and
        unmap, but change nothing another process now serves (no reset: the
        shared memory and the client's view stay exactly as they are)."""
        self.session = None
        self.dma.message_io = None
        self.dma.close()
        self.irqs.clear()  # closes our copies only
        for region in self.regions.values():
            close = getattr(region, "close", None)
            if close:
                close()

    # ------------------------------------------------------------------ snapshot
    def device_snapshot(self) -> Snapshot | None:
        """The device type's own state (registers, queues); None if it has none."""
        return None

    def device_restore(self, snap: Snapshot | None) -> None:
        require(snap is None, f"{self.type_name} keeps no device state, the snapshot has some")

    def snapshot(self) -> "FunctionSnapshot":
        """Everything needed to rebuild this function, attached client included,
        in a fresh process built from the same configuration.

        Taken at a message boundary with no device work running (quiesced).
        """
        ext = self.ext
        return FunctionSnapshot(
            type_name=self.type_name,
            name=self.name,
            props=ext.properties() if ext is not None else {},
            config=self.config.snapshot(),
            msix=self.msix.snapshot() if self.msix is not None else None,
            irqs=self.irqs.snapshot(),
            dma=self.dma.snapshot(),
            bars={i: b.region.snapshot() for i, b in sorted(self.config.bars.items())
                  if hasattr(b.region, "snapshot")},
            zpci=ext.snapshot() if ext is not None else None,
            device=self.device_snapshot(),
            counters=attrs.asdict(self.counters, filter=lambda a, v: a.name != "errors"),
            errors=dict(self.counters.errors),
        )

    def restore(self, snap: "FunctionSnapshot") -> None:
        """Become the function ``snap`` was taken of (this one is fresh: no client).

        Takes ownership of every fd in ``snap``; on failure they are closed and
        this function is left detached and reset.
        """
        try:
            expect(snap, FunctionSnapshot)
            require(snap.type_name == self.type_name,
                    f"snapshot of a {snap.type_name} function, this is a {self.type_name}")
            require(self.session is None and len(self.dma) == 0, "function to restore into is in use")
            require(sorted(snap.bars) == sorted(i for i, b in self.config.bars.items()
                                                 if hasattr(b.region, "snapshot")),
                    f"snapshot BARs {sorted(snap.bars)} differ from this function's")
            require((snap.msix is None) == (self.msix is None), "MSI-X presence differs")
            require((snap.zpci is None) == (self.ext is None), "zPCI layer presence differs")
            if self.ext is not None:
                self.ext.set_properties(snap.props)
        except BaseException:
            snap.close_fds()
            raise
        steps = [(snap.config, self.config.restore)]
        if self.msix is not None:
            steps.append((snap.msix, self.msix.restore))
        steps += [(region_snap, self.config.bars[i].region.restore) for i, region_snap in snap.bars.items()]
        steps += [(snap.irqs, self.irqs.restore), (snap.dma, self.dma.restore)]
        if self.ext is not None:
            steps.append((snap.zpci, self.ext.restore))
        steps.append((snap.device, self.device_restore))
        done = 0
        try:
            for layer, restore in steps:
                done += 1  # a layer's restore takes its fds, also when it fails
                restore(layer)
        except BaseException:
            for layer, _ in steps[done:]:
                if layer is not None:
                    layer.close_fds()
            self.detach()  # releases what the restored layers took
            raise
        counters = {k: v for k, v in snap.counters.items() if k in attrs.fields_dict(FunctionCounters)}
        self.counters = FunctionCounters(**counters, errors=collections.Counter(snap.errors))

    def close(self) -> None:
        """Release the function's own resources (the daemon is done with it)."""
        self.detach()
        for region in self.regions.values():
            close = getattr(region, "close", None)
            if close:
                close()


@attrs.frozen
class FunctionSnapshot(Snapshot):
    """One function: PCI layers, client DMA maps and eventfds, BAR memory, zPCI and device state."""

    KIND = "pci.function"
    type_name: str
    name: str
    props: dict
    config: Snapshot
    msix: Snapshot | None
    irqs: Snapshot
    dma: Snapshot
    bars: dict
    zpci: Snapshot | None
    device: Snapshot | None
    counters: dict
    errors: dict
