"""zpcid: s390x zPCI function emulation for VMMs over vfio-user."""

__version__ = "0.1.0"
