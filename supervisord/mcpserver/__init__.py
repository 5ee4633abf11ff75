"""``claude-pm mcp``: the Model Context Protocol server for orchestrating agents.

Needs the optional ``mcp`` extra (the official SDK); nothing outside this package imports it.
"""
