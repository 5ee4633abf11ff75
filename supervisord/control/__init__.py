"""The control channel: protocol (both ends), server, command handlers, clients."""
