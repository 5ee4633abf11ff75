"""The kernel backstop: per-agent memory cgroups on v1 and v2."""
