"""The daemon as a service: configuration, control socket, metrics, systemd integration, CLIs."""
