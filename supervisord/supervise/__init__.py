"""Agent ownership: the sampling loop, agent state, the event bus, launch planning."""
