"""zPCI I/O translation done by zpcid: one translator per function.

* ``shadow.ShadowIotlb`` — the shadow of the guest's tables (T = 1), written only
  by its own methods;
* ``walk.rpcit`` — validates an RPCIT and brings the shadow up to date
  (``rpcit_sliced``: the same over big ranges with checkpoints between slices);
* ``lazy.LazyIotlb`` — the shadow as a cache filled from the tables on a miss
  (the group's refresh bit off); ``walk.invalidate`` is its RPCIT;
* ``direct.DirectMap`` — relaxed translation (T = 0), clipped at the guest
  memory limit.

All translators answer ``translate(iova, length, write)`` with guest
(address, length) pieces or raise ``TranslationError`` (PEC, failing IOVA).
"""

from zpcid.zpci.iommu.direct import DirectMap
from zpcid.zpci.iommu.errors import GuestMemory, TranslationError
from zpcid.zpci.iommu.shadow import ShadowIotlb
from zpcid.zpci.iommu.walk import SMALL_WALK_PAGES, RpcitResult, invalidate, rpcit, rpcit_sliced
from zpcid.zpci.iommu.lazy import LazyIotlb

__all__ = ["DirectMap", "GuestMemory", "LazyIotlb", "RpcitResult", "SMALL_WALK_PAGES", "ShadowIotlb",
           "TranslationError", "invalidate", "rpcit", "rpcit_sliced"]
