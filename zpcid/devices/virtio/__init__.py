"""Virtio 1.x over PCI (modern transport): capabilities, common config, split virtqueues."""
