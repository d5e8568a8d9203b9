"""The kvmm service: protocol, configuration, server, systemd integration (see docs/protocol.md)."""
