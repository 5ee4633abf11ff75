"""The pure core: value types, the escalation policy and its cadence. Standard library only."""
