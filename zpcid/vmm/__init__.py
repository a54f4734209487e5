"""The VMM-side toolkit (like trio.testing beside trio): client, zPCI client, model VMM, guest tables, virtio driver.

Never imported by the daemon."""
