"""Per-function zPCI properties (identity, group, aperture, feature fencing)."""

from __future__ import annotations

import attrs

# Compatibility levels fence guest-visible features: a function keeps the
# behaviour of the level it was created with, so a guest never sees a feature
# appear or vanish under it (same idea as QEMU's machine-type compat props).
COMPAT_LEVELS = (1, 2, 3)
LATEST_COMPAT = 3
_RTR_DEFAULT = {1: False, 2: True, 3: True}
# Level 3 stops asking the guest for an RPCIT after every new mapping (the CLP
# refresh bit): zpcid then fetches translations from the guest's tables itself
# on a shadow miss (docs/decisions.md, "Lazy translation").
_REFRESH_DEFAULT = {1: True, 2: True, 3: False}

DEFAULT_SDMA = 0x1_0000_0000
DEFAULT_PFGID = 0x01
DEFAULT_MAXSTBL = 128
DEFAULT_DMA_LIMIT = 65535
MODES = ("vmm-translates", "zpcid-translates")


def _u(bits: int):
    def check(inst, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
            raise ValueError(f"{attribute.name} must be an integer in [0, {(1 << bits) - 1}]")
    return check


@attrs.frozen
class ZpciProperties:
    fid: int = attrs.field(default=0, validator=_u(32))
    uid: int = attrs.field(default=1, validator=_u(16))
    pchid: int = attrs.field(default=0, validator=_u(16))
    pfgid: int = attrs.field(default=DEFAULT_PFGID, validator=_u(8))
    vfn: int = attrs.field(default=0, validator=_u(16))
    compat: int = attrs.field(default=LATEST_COMPAT)
    relaxed_translation: bool | None = None  # None: the compat level's default
    relaxed_alignment: bool = False
    tlb_refresh: bool | None = None  # None: the compat level's default
    dma_limit: int = attrs.field(default=DEFAULT_DMA_LIMIT)
    maxstbl: int = attrs.field(default=DEFAULT_MAXSTBL)
    sdma: int = attrs.field(default=DEFAULT_SDMA, validator=_u(64))
    util_str: str = ""
    mode: str = attrs.field(default="vmm-translates")  # until the VMM selects one

    @compat.validator
    def _compat(self, attribute, value):
        if value not in COMPAT_LEVELS:
            raise ValueError(f"compat must be one of {COMPAT_LEVELS}")

    @dma_limit.validator
    def _dma_limit(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= (1 << 32):
            raise ValueError("dma_limit must be an integer in [1, 2**32]")

    @maxstbl.validator
    def _maxstbl(self, attribute, value):
        if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 4096 or value % 8:
            raise ValueError("maxstbl must be a multiple of 8 in [16, 4096]")

    @mode.validator
    def _mode(self, attribute, value):
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}")

    @property
    def rtr(self) -> bool:
        """Relaxed translation in effect (explicit setting, else the compat default)."""
        if self.relaxed_translation is not None:
            return self.relaxed_translation
        return _RTR_DEFAULT[self.compat]

    @property
    def refresh(self) -> bool:
        """The group's refresh bit in zpcid-translates mode: the guest issues RPCIT
        after creating mappings (explicit setting, else the compat default)."""
        if self.tlb_refresh is not None:
            return self.tlb_refresh
        return _REFRESH_DEFAULT[self.compat]
