"""The PCI function model: config space and capabilities, MSI-X, the function."""
