"""Compatibility package for the operational guide: thin wrappers over ``supervisord``."""
