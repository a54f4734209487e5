"""s390x zPCI architected formats and the zpcid control-region ABI, sans-I/O."""
