"""vfio-user server side: transport, endpoint, per-function socket server, DMA space, regions, IRQs."""
