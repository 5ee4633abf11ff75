"""The host edge: /proc, launching, signals, memory cgroups, system memory, systemd."""
