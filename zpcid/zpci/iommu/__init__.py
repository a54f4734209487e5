"""zPCI I/O translation done by zpcid: one translator per function.

* ``shadow.ShadowIotlb`` — the shadow of the guest's tables (T = 1), written only
  by its own methods;
* ``walk.rpcit`` — validates an RPCIT and brings the shadow up to date
  (``rpcit_sliced``: the same over big ranges with checkpoints between slices);
* ``direct.DirectMap`` — relaxed translation (T = 0), clipped at the guest
  memory limit.

Both translators answer ``translate(iova, length, write)`` with guest
(address, length) pieces or raise ``TranslationError`` (PEC, failing IOVA).
"""

from zpcid.zpci.iommu.direct import DirectMap
from zpcid.zpci.iommu.errors import GuestMemory, TranslationError
from zpcid.zpci.iommu.shadow import ShadowIotlb
from zpcid.zpci.iommu.walk import SMALL_WALK_PAGES, RpcitResult, rpcit, rpcit_sliced

__all__ = ["DirectMap", "GuestMemory", "RpcitResult", "SMALL_WALK_PAGES", "ShadowIotlb",
           "TranslationError", "rpcit", "rpcit_sliced"]
