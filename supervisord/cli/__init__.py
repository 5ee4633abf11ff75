"""The command line: argv in, client calls, rendering, exit codes."""
