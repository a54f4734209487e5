"""Demo and benchmark programs built on the daemon and the VMM toolkit."""
