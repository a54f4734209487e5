"""The zPCI layer of a function, composed onto a PCI function from above.

* ``function`` — ``ZpciFunction``: a PCI function with its ``ZpciCore``
  attached through the function's extension interface; device types derive
  from it. It is the core's ``port.FunctionPort`` (the only way the core
  reaches the function).
* ``core`` — ``ZpciCore``: registrations (I/O address translation with one
  translator, adapter interruptions, measurement), error/availability events,
  the DMA-path translation and the interrupt-delivery hook; snapshot/restore.
* ``state`` — the function state and handle: one transition table.
* ``instructions`` — one handler per instruction (CLP, MPCIFC, STPCIFC,
  RPCIT, PCISTB, PCILG, PCISTG) and the register write-back rule.
* ``region`` — the control region (publish, doorbell, event ring); its ABI
  lives in ``protocol.zpci.region``.
* ``interrupts`` — AIBV/AISB indicator bits; ``atomic`` — the atomic OR.
* ``measurement`` — the FMB and its MUI timer.
* ``dma_path`` — the DMA API device models use.
* ``iommu`` — ``shadow`` (the shadow IOTLB), ``walk`` (RPCIT: validation and
  table walk), ``direct`` (the direct map of relaxed translation).
"""
