"""Configuration: defaults, the TOML file, the environment, the home layout."""
