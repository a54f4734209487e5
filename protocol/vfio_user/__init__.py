"""The vfio-user wire protocol, sans-I/O: header, constants, messages, framing."""
