"""The zPCI layer of a function: CLP data, instructions, shadow IOMMU, direct map, adapter interrupts."""
